"""build = (plan when nothing is asked for) -> evaluate (ingest -> select -> data -> compress -> candidates ->
time) -> package, staged and moved into place only when complete.

`evaluate` does the work in memory; this module decides whether to plan first and writes the package.
A rejected build is kept beside DIR as DIR.rejected, never where a valid package would be.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from edgekit.console import note
from edgekit.errors import EXIT_FAILED, EXIT_OK
from edgekit.pipeline.assemble import write_package
from edgekit.pipeline.evaluate import evaluate
from edgekit.pipeline.options import BuildOptions, BuildResult, default_out
from edgekit.targets import load_target
from edgekit.workspace import Staging

__all__ = ["BuildOptions", "BuildResult", "build"]


def build(opts: BuildOptions) -> BuildResult:
    """`edgekit build`: the package for `opts.model` on `opts.target`. Without a plan and with no precision
    asked for, the planner chooses first (`_build_planned`); otherwise the target's rules or the given plan."""
    if opts.plan is None and opts.auto_plan and opts.precisions in (None, [], ["auto"]) and opts.backend != "all":
        return _build_planned(opts)
    target = load_target(opts.target)
    out = Path(opts.out or default_out(opts.model, target.name))
    staging = Staging(out, force=opts.force)  # refuses an existing DIR before any work
    with tempfile.TemporaryDirectory(prefix="edgekit-work-") as work, staging:
        ev = evaluate(opts, target, staging.path, out, Path(work))
        write_package(staging.path, ev.manifest, ev.plan, ev.preprocess)
        # Never leave a package that looks valid: a rejected build goes beside DIR, named so.
        path = staging.commit(out if ev.passed else out.with_name(out.name + ".rejected"))
    return BuildResult(ev.manifest, path, EXIT_OK if ev.passed else EXIT_FAILED)


def _build_planned(opts: BuildOptions) -> BuildResult:
    """`edgekit build` without a plan or a precision: plan first (every candidate built, verified and
    timed), then build exactly what the plan chose; the package keeps the candidates for the report."""
    from edgekit.planning.search import Budgets, plan_model

    # An existing or unwritable --out is refused before the planner's work.
    Staging(opts.out or default_out(opts.model, load_target(opts.target).name), force=opts.force)
    with tempfile.TemporaryDirectory(prefix="edgekit-autoplan-") as tmp:
        plan_path = Path(tmp) / "plan.yaml"
        note("no plan and no precision given: planning first (`edgekit plan`), then building its choice")
        plan_model(opts, Budgets(max_accuracy_drop=opts.thresholds.max_accuracy_drop), plan_path,
                   device=opts.device)
        return build(dataclasses.replace(opts, plan=str(plan_path)))
