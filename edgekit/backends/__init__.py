"""Backends register themselves here; adding a backend is adding a module to this package, or
registering a Backend class from anywhere (`register`).

The pipeline only talks to the `Backend` protocol in `base`, never to a backend by name. A backend
registered from a module outside this package is found again in edgekit's worker processes (the timing
and memory processes start fresh): its module is added to $EDGEKIT_BACKENDS (comma-separated module
names), which every process imports on discovery; a user may set it to add backends to the CLI too.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from edgekit.backends.base import Artifact, Backend, OpIssue, Session
from edgekit.errors import BackendUnavailable, BadInput

# The backend whose FP32 build of the canonical ONNX is every artifact's yardstick (verification, speedups).
REFERENCE_BACKEND = "onnxruntime"
ENV_MODULES = "EDGEKIT_BACKENDS"
_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    module = cls.__module__
    if not module.startswith(f"{__name__}.") and module not in ("__main__", "__mp_main__"):
        _set_env_modules([*_env_modules(), module])
    return cls


def unregister(name: str) -> None:
    """Forget a backend registered from outside this package (and its module, for worker processes)."""
    cls = _REGISTRY.pop(name, None)
    if cls is not None and not any(c.__module__ == cls.__module__ for c in _REGISTRY.values()):
        _set_env_modules([m for m in _env_modules() if m != cls.__module__])


def _env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV_MODULES, "").split(",") if m.strip()]


def _set_env_modules(modules: list[str]) -> None:
    if modules:
        os.environ[ENV_MODULES] = ",".join(dict.fromkeys(modules))
    else:
        os.environ.pop(ENV_MODULES, None)


def _discover() -> None:
    # Backend modules import their heavy library lazily, so importing them all is cheap.
    # A backend is one module here, or one folder whose backend.py registers it.
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}" + (".backend" if mod.ispkg else ""))
    for module in _env_modules():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise BadInput(f"${ENV_MODULES} names module {module}, which does not import: {e}") from None


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    _discover()
    if name not in _REGISTRY:
        raise BadInput(f"unknown backend '{name}'; edgekit has: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def all_backends() -> list[Backend]:
    """One instance of every backend edgekit has, by name."""
    return [get(name) for name in names()]


def joining(target: str) -> list[str]:
    """Backends that run on `target` besides those its YAML lists (Backend.extra_targets), by name."""
    return [name for name in names() if target in _REGISTRY[name].extra_targets]


def get_installed(name: str) -> Backend:
    backend = get(name)
    missing = backend.missing()
    if missing:
        raise BackendUnavailable(f"backend {name} is not usable here: {missing}")
    return backend


__all__ = ["REFERENCE_BACKEND", "Artifact", "Backend", "OpIssue", "Session", "all_backends", "get", "get_installed",
           "joining", "names", "register", "unregister"]
