"""Loading less on every CNI call, which is a new process each time: modules loaded on first
use, and packages whose __init__ imports far more than the part the plugin uses. Each
module costs about 0.5-1 ms to load in the frozen binary (measured in bench/results.md:
29 ms of a chained ADD for the link and Kubernetes modules)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy(name: str) -> ModuleType:
    """The module `name`, executed when one of its attributes is first used."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"module {name} is not in this build", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def without_package_init(package: str) -> None:
    """Make the submodules of `package` importable without running its __init__.py, which
    imports all of the package (pyroute2's every subsystem, about 60 ms; pydantic_core's
    core_schema helpers, 20-30 ms). The package object is made from its spec so submodules
    import normally; the first use of one of its top-level names from elsewhere runs the
    real __init__, so other users see the usual package."""
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    module = importlib.util.module_from_spec(spec)
    completing = []

    def complete(name):
        # `from package import submodule` asks for the attribute before importing the
        # submodule: submodules must not run the real __init__.
        if completing or name.startswith("__") or importlib.util.find_spec(f"{package}.{name}"):
            raise AttributeError(name)
        completing.append(name)
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = complete
    sys.modules[package] = module
