"""Where a round's candidates are evaluated (export -> verify -> recover -> localise): here, one after another
(LocalExecutor), or as tasks on a Ray cluster (edgekit.cluster, `--cluster ADDRESS|local`). Timing never goes
through an executor: the caller times the candidates it compares side by side on one measurer, after map()."""

from __future__ import annotations

from typing import Any, Protocol

from edgekit.pipeline.candidates import CandidateContext, CandidateResult, evaluate_candidate
from edgekit.planning.types import ArtifactPlan


class CandidateExecutor(Protocol):
    def map(self, ctx: CandidateContext, plans: list[ArtifactPlan]) -> list[CandidateResult]:
        """Every plan evaluated, results in the plans' order, artifacts under ctx.root as the local path leaves them."""
        ...

    def record(self) -> dict[str, Any] | None:
        """What ran where and what was retried (the plan's `run`), or None for a local run."""
        ...


class LocalExecutor:
    def map(self, ctx: CandidateContext, plans: list[ArtifactPlan]) -> list[CandidateResult]:
        return [evaluate_candidate(ctx, ap) for ap in plans]

    def record(self) -> dict[str, Any] | None:
        return None


def executor_for(cluster: str | None) -> CandidateExecutor:
    """LocalExecutor without a cluster; else the Ray executor connected to `cluster` (an address, or "local")."""
    if not cluster:
        return LocalExecutor()
    from edgekit.cluster import RayExecutor

    return RayExecutor.connect(cluster)
