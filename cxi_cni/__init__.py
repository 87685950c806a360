"""cxi-cni: a CNI plugin that gives each pod its own CXI service on HPE Slingshot NICs."""

__version__ = "0.1.0"
