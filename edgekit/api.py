"""The Python API: the CLI's verbs as functions returning the manifest / plan objects.

    import edgekit
    pkg = edgekit.build("model.onnx", target="host-cpu", calib="images/", precision="int8")
    print(pkg.passed, pkg.artifact("onnxruntime-int8")["latency_ms"]["p50"])

Errors are the same exceptions the CLI turns into exit codes (edgekit.errors: BadInput -> 2,
VerificationFailed -> 1, other EdgekitError -> 3); a build whose artifacts fail verification returns a
Manifest with `passed` False (and `path` pointing at OUT.rejected), as the CLI exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Manifest(dict):  # type: ignore[type-arg]
    """A package's manifest.json (a dict, as documented in docs/manifest.md) with its folder."""

    def __init__(self, data: dict[str, Any], path: Path | None = None, exit_code: int | None = None) -> None:
        super().__init__(data)
        self.path = path
        self.exit_code = exit_code if exit_code is not None else (0 if data.get("passed") else 1)

    @classmethod
    def load(cls, package: str | Path) -> Manifest:
        from edgekit.packaging.model import load_package  # BadInput when it is not a package

        loaded = load_package(package)
        return cls(loaded.manifest, loaded.path)

    @property
    def passed(self) -> bool:
        return bool(self.get("passed"))

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return list(self.get("artifacts", []))

    def artifact(self, key: str) -> dict[str, Any]:
        for a in self.artifacts:
            if a["key"] == key:
                return a
        raise KeyError(f"no artifact {key} in {self.path} (it has {', '.join(a['key'] for a in self.artifacts)})")


def build(model: str | Path, target: str, *, precision: str | list[str] | None = None, **options: Any) -> Manifest:
    """`edgekit build`. Options are BuildOptions' fields (out, backend, calib, val, preprocess, plan,
    input_shapes, calib_method, threads, force, cache, ...), Thresholds' fields (min_cosine,
    max_accuracy_drop, ...), profile_seconds and min_runs."""
    from edgekit.cli.options import build_options
    from edgekit.pipeline.build import build as run_build

    result = run_build(build_options(str(model), target, precision, **options))
    return Manifest(result.manifest, result.path, result.exit_code)


def plan(model: str | Path, target: str, *, out: str | Path = "plan.yaml", max_accuracy_drop: float = 1.0,
         max_latency_ms: float | None = None, max_size_mb: float | None = None, objective: str = "latency",
         prune: list[float] | None = None, train: str | None = None, device: str | None = None,
         precision: str | list[str] | None = None, **options: Any) -> Any:
    """`edgekit plan`: returns the Plan (edgekit.planning.types.Plan; `.candidates` lists every candidate) and
    writes it to `out`."""
    from edgekit.cli.options import build_options
    from edgekit.planning.search import Budgets, PruneSearch, plan_model

    opts = build_options(str(model), target, precision, memory=False, **options)
    search = PruneSearch(list(prune), train=train) if prune else None
    chosen, _ = plan_model(opts, Budgets(max_accuracy_drop, max_latency_ms, max_size_mb, objective), out,
                           prune=search, device=device)
    return chosen


def profile(package: str | Path, device: str, *, seconds: float = 3.0, min_runs: int = 50,
            artifacts: list[str] | None = None) -> Manifest:
    """`edgekit profile PACKAGE --device NAME`: measures on the device; returns the updated manifest."""
    from edgekit.profiling.device import RemoteSettings, profile_package
    from edgekit.profiling.devices import get_device

    profile_package(package, get_device(device), RemoteSettings(seconds=seconds, min_runs=min_runs), artifacts)
    return Manifest.load(package)


def profile_pool(packages: list[str | Path], devices: list[str] | None = None, *, target_devices: str | None = None,
                 once: bool = False, cluster: str | None = None, seconds: float = 3.0, min_runs: int = 50,
                 threads: int | None = None, artifacts: list[str] | None = None) -> Any:
    """`edgekit profile PKG... --devices A,B | --target-devices T [--once] [--cluster ADDRESS|local]`: returns the
    run (edgekit.profiling.pool.PoolRun: every job's outcome, lost devices, retries); manifests updated."""
    from edgekit.cli.profile_pool import profile_on_pool
    from edgekit.profiling.device import RemoteSettings

    run, _ = profile_on_pool([Path(p) for p in packages], RemoteSettings(seconds=seconds, min_runs=min_runs,
                                                                         threads=threads),
                             ",".join(devices) if devices else None, target_devices, once, cluster, artifacts)
    return run


def inspect(model: str | Path, input_shapes: list[str] | None = None, weights: str | None = None) -> Any:
    """`edgekit inspect`: the canonical model's ModelSpec (inputs, outputs, per-layer MACs)."""
    import tempfile

    from edgekit.ingest import ingest, parse_input_shapes

    with tempfile.TemporaryDirectory(prefix="edgekit-inspect-") as work:
        return ingest(str(model), work, parse_input_shapes(input_shapes or []), weights)


def package(directory: str | Path, *, format: str = "zip", out: str | Path | None = None,
            force: bool = False) -> dict[str, Any]:
    """`edgekit package DIR --format zip|tar.gz`: one archive with checksums; returns its path, bytes,
    files and sha256."""
    from edgekit.packaging.archive import create_archive

    return create_archive(directory, out, format, force=force)


def verify_package(archive: str | Path) -> Any:
    """`edgekit package --verify ARCHIVE`: raises on a tampered (VerificationFailed) or unsafe (BadInput)
    archive, else returns what was checked."""
    from edgekit.packaging.archive import verify_archive

    return verify_archive(archive)


def compare(package_a: str | Path, package_b: str | Path, *, recorded: bool = False) -> dict[str, Any]:
    """`edgekit compare A B`: the differences (ratios B / A), latencies re-timed side by side here unless
    `recorded`."""
    from edgekit.packaging.compare import CompareOptions
    from edgekit.packaging.compare import compare as run_compare
    from edgekit.packaging.model import load_package

    return run_compare(load_package(package_a), load_package(package_b), CompareOptions(recorded=recorded))


def check(package: str | Path, baseline: str | Path, *, max_latency_regression: float = 5.0,
          max_accuracy_drop: float = 0.5, max_size_increase: float | None = None, recorded: bool = False
          ) -> dict[str, Any]:
    """`edgekit check PKG --baseline OLD`: the regression gate (percentages as numbers: 5.0 = 5%);
    `passed` is False when the new package is worse, `checks` says where."""
    from edgekit.packaging.compare import CompareOptions, RegressionLimits
    from edgekit.packaging.compare import check as run_check

    limits = RegressionLimits(latency=max_latency_regression / 100, accuracy_points=max_accuracy_drop,
                    size=None if max_size_increase is None else max_size_increase / 100)
    return run_check(package, baseline, limits, CompareOptions(recorded=recorded))
