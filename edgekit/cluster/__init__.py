"""edgekit on a Ray cluster (the optional extra `edgekit[ray]`): candidates as Ray tasks (candidates.py), devices as
Ray resources (devices.py). The only package that imports ray; without it everything runs locally."""

from edgekit.cluster.candidates import RayExecutor

__all__ = ["RayExecutor"]
