"""A backend registered from a file under tests/, built with through the Python API: adding a backend
touches no edgekit file (issue 13)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUNDLED_ONNX, BUNDLED_PREPROCESS

from edgekit import backends


@pytest.fixture
def toy() -> Iterator[type]:
    """The toy backend, registered for this test only: later tests (and their CLI processes, which could
    not import tests/toy_backend.py) must not see it."""
    import toy_backend

    backends.register(toy_backend.ToyBackend)  # idempotent: importing it registered it already
    try:
        yield toy_backend.ToyBackend
    finally:
        backends.unregister("toy")
    assert "toy" not in backends.names() and "toy_backend" not in os.environ.get(backends.ENV_MODULES, "")


def test_toy_backend_builds_verifies_and_times(toy: type, defects_data: Path, tmp_path: Path) -> None:
    import edgekit
    from edgekit.targets import load_target

    assert "toy" in backends.names()
    assert "toy" in load_target("host-cpu").backends  # joined through Backend.extra_targets
    pkg = edgekit.build(BUNDLED_ONNX, "host-cpu", precision="fp32", backend="toy", calib=str(defects_data / "calib"),
                        val=str(defects_data / "val"), preprocess=str(BUNDLED_PREPROCESS), out=str(tmp_path / "pkg"),
                        profile_seconds=0.1, min_runs=10, memory=False, cache=False)
    assert pkg.passed, pkg.get("warnings")
    art = pkg.artifact("toy-fp32")
    assert art["backend"] == "toy" and art["precision"] == "fp32"
    assert art["verification"]["passed"] is True
    assert art["verification"]["cosine_min"] > 0.9999
    assert art["latency_ms"]["p50"] > 0 and art["latency_ms"]["runs"] >= 10
    assert (tmp_path / "pkg" / "toy-fp32" / "model.onnx").is_file()


def test_toy_backend_localises_through_its_session(toy: type, tmp_path: Path) -> None:
    """run_intermediates, the Session protocol's second method, as `edgekit debug` uses it."""
    from test_backend_onnxruntime import _calib, _conv_model, _mk

    from edgekit.ingest import ingest
    from edgekit.planning.types import ArtifactPlan
    from edgekit.verify.localise import localise

    spec = ingest(str(_conv_model(tmp_path / "m.onnx")), tmp_path / "w")
    backend = backends.get("toy")
    art = backend.export(spec, ArtifactPlan("toy", "fp32"), None, _mk(tmp_path / "a"))
    feeds = _calib(1).batches(spec)[0]
    loc = localise(spec, art, backend.load(art, 1), feeds, 0.999, name_worst=False)
    assert loc.compared >= 2 and loc.first_divergence is None
    assert all(la.matched_by == "name" and la.cosine > 0.9999 for la in loc.layers)


def test_device_runner_tables_agree_with_the_registry() -> None:
    """The device runner (standard library only, so it cannot ask the registry) names backends in its
    own tables: they must say what each backend's device_modules says."""
    from edgekit.profiling import runner

    declared = {b.name: b.device_modules for b in backends.all_backends() if b.device_modules is not None}
    assert declared == runner.BACKEND_NEEDS
    engine_built = {b.name for b in backends.all_backends() if b.needs_engine_build_on_device}
    # every backend the runner can run has a loader, except engines built and timed by trtexec
    assert set(declared) - engine_built <= set(runner.LOADERS) <= set(declared)
