"""edgekit: trained model in, verified and measured device package out.

Stages, one module each: ingest -> targets -> data -> plan -> (compress) -> backends (export)
-> verify -> profile -> package; `pipeline` chains them and `cli` exposes each.
"""

__version__ = "0.1.0"
