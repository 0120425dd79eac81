"""Backends register themselves here; adding a backend is adding a module to this package.

The pipeline only talks to the `Backend` protocol in `base`, never to a backend by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from edgekit.backends.base import Artifact, Backend, OpIssue, Session
from edgekit.errors import BackendUnavailable, BadInput

_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    # Backend modules import their heavy library lazily, so importing them all is cheap.
    # A backend is one module here, or one folder whose backend.py registers it.
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}" + (".backend" if mod.ispkg else ""))


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    _discover()
    if name not in _REGISTRY:
        raise BadInput(f"unknown backend '{name}'; edgekit has: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def get_installed(name: str) -> Backend:
    backend = get(name)
    missing = backend.missing()
    if missing:
        raise BackendUnavailable(f"backend {name} is not usable here: {missing}")
    return backend


__all__ = ["Artifact", "Backend", "OpIssue", "Session", "get", "get_installed", "names", "register"]
