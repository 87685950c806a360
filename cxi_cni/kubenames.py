"""Kubernetes object names, checked before any of them goes into an API path: a namespace is
an RFC 1123 label, every object the plugin reads by name (pod, Job, ReplicaSet...) a DNS
subdomain. Anything else ('/', '..', '%', upper case) could make a path name another object."""

from __future__ import annotations

import re

# \Z, not $: "$" also matches before a trailing newline.
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
OBJECT_NAME_RE = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")
NAMESPACE_RULE = "an RFC 1123 label (a-z, 0-9, '-', at most 63)"
OBJECT_NAME_RULE = "a DNS subdomain (labels of a-z, 0-9, '-' joined by '.', at most 253)"
