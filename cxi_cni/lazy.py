"""Modules loaded on first use. Each module costs about 0.5-1 ms to load in the frozen binary,
and every CNI call is a new process: what only the pod's link, the Kubernetes lookup or
one backend needs is loaded when that path runs, so a chained ADD does not pay for it
(measured in bench/results.md: 29 ms of a chained ADD)."""

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
