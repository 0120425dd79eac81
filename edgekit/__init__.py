"""edgekit: trained model in, verified and measured device package out.

Stages, one module each: ingest -> targets -> data -> plan -> (compress) -> backends (export)
-> verify -> profile -> package; `pipeline` chains them, `cli` exposes each verb and `api` the same
verbs in Python (`edgekit.build`, `edgekit.planning.types`, ...; imported on first use, so `import edgekit` stays
light).
"""

from typing import Any

from edgekit.version import __version__

API = ("build", "plan", "profile", "inspect", "package", "verify_package", "compare", "check", "Manifest")


def __getattr__(name: str) -> Any:
    if name in API:
        from edgekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")


__all__ = [*API, "__version__"]
