"""Connecting to a Ray cluster: `--cluster ADDRESS` (a running cluster's head, host:port) or `local` (a Ray of this
process's own, started with this machine's devices as resources). RAY_ADDRESS is never consulted: the address is
what the user named."""

from __future__ import annotations

from typing import Any

from edgekit.errors import BadInput

DEVICE_RESOURCE = "edgekit-device:"  # + the device's name: one unit, on the node that reaches it


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput("--cluster needs Ray: pip install 'edgekit[ray]'") from None
    return ray


def connect(address: str, resources: dict[str, float] | None = None) -> Any:
    """The ray module, connected. `resources` only apply to `local` (a running cluster's are fixed at `ray start`)."""
    ray = ray_module()
    if not ray.is_initialized():
        local = address == "local"
        extra = {"resources": resources} if local and resources else {}
        try:
            ray.init(address="local" if local else address, namespace="edgekit", log_to_driver=True,
                     include_dashboard=False, configure_logging=False, **extra)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BadInput(f"--cluster {address}: cannot connect to a Ray cluster there ({e}); start one with "
                           "`ray start --head` or pass --cluster local") from None
    return ray


def system_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Failures of the cluster, not of the work: a worker, node or object lost."""
    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError",
             "RaySystemError", "TaskUnschedulableError", "ActorDiedError", "ActorUnavailableError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def device_resources(names: list[str]) -> dict[str, float]:
    """What `ray start --resources` gives a node that reaches these devices."""
    return {DEVICE_RESOURCE + n: 1 for n in names}


def alive_resources(ray: Any) -> dict[str, list[str]]:
    """{resource name: [node ids of live nodes offering it]}."""
    found: dict[str, list[str]] = {}
    for n in ray.nodes():
        if n.get("Alive"):
            for r, amount in (n.get("Resources") or {}).items():
                if amount > 0:
                    found.setdefault(r, []).append(n["NodeID"])
    return found
