"""The build's expensive stages (ingest, export, outputs, timing, memory, per-layer times, compression),
each through the build cache (edgekit/cache.py): a stage's key hashes exactly what its result depends on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import backends
from edgekit.backends.base import Artifact
from edgekit.console import note, progress
from edgekit.data import DataSplit, Preprocess
from edgekit.ingest import ModelSpec, ingest
from edgekit.planning.types import ArtifactPlan
from edgekit.profiling.measurer import LocalMeasurer
from edgekit.profiling.timing import Latency, ProfileSettings, peak_memory_mb
from edgekit.targets import Target
from edgekit.verify.verifier import run_all

if TYPE_CHECKING:
    from edgekit.compress.stage import CompressOptions, TaskGuide
    from edgekit.pipeline.options import BuildOptions
    from edgekit.tasks.evaluator import TaskSettings


class CachedStages:
    """The build's expensive stages, each through the build cache (edgekit/cache.py): the key of a stage
    hashes exactly what its result depends on, so a changed input reruns only what depends on it."""

    def __init__(self, opts: BuildOptions) -> None:
        from edgekit.cache import BuildCache

        self.cache = BuildCache(enabled=opts.cache)
        self.remeasure = opts.remeasure
        self._digests: dict[int, tuple[Any, str | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Sent to a cluster worker: digests keyed by id() mean nothing in another process (ids would collide).
        return {**self.__dict__, "_digests": {}}

    def data(self, dataset: Any) -> str | None:
        from edgekit.cache import dataset_digest

        if id(dataset) not in self._digests:  # the dataset is kept alive with its digest: ids stay unique
            self._digests[id(dataset)] = (dataset, dataset_digest(dataset))
        return self._digests[id(dataset)][1]

    def ingest(self, source: str, workdir: Path, shapes: dict[str, list[int]], weights: str | None) -> ModelSpec:
        from edgekit.cache import digest
        from edgekit.ingest import sha256_file

        path = Path(source)
        origin = sha256_file(path) if path.is_file() else [source, sha256_file(weights) if weights else None]
        key = digest("ingest", origin, shapes, _versions("onnx", "onnxslim", "torch", "onnxscript"))
        meta = self.cache.get_tree("ingest", key, workdir, "ingest")
        if meta is not None:
            return ModelSpec.from_dict({**meta, "source": source, "onnx_path": str(workdir / "model.onnx"),
                                        "torch_weights": weights if meta.get("torch_factory") else None})
        spec = ingest(source, workdir, shapes, weights)
        self.cache.put_tree("ingest", key, workdir, ["model.onnx"], spec.to_dict(layers=True))
        return spec

    def export(self, spec: ModelSpec, ap: ArtifactPlan, data: DataSplit, folder: Path) -> Artifact:
        from edgekit.cache import digest

        backend = backends.get(ap.backend)
        calibration = self.data(data.calibration) if ap.precision == "int8" else None
        validation = self.data(data.validation) if backend.simulates_at_export else None
        key = digest("export", spec.sha256, dataclasses.asdict(ap), calibration, validation, backend.versions())
        meta = self.cache.get_tree("export", key, folder, f"export {ap.backend}-{ap.precision}")
        if meta is not None:
            return Artifact(**{**meta, "root": str(folder)})
        note(f"export {ap.backend} {ap.precision}")
        folder.mkdir(parents=True)
        if backend.simulates_at_export:  # its simulator runs the validation samples in the process that built it
            art = backend.export(spec, ap, data.calibration, folder, validation=data.validation)  # type: ignore[call-arg]
        else:
            art = backend.export(spec, ap, data.calibration, folder)
        self.cache.put_tree("export", key, folder, art.files, art.to_dict())
        return art

    def outputs(self, art: Artifact, batches: list[dict[str, np.ndarray]], threads: int) -> list[np.ndarray]:
        """The artifact's outputs on the validation batches (what verification compares)."""
        from edgekit.cache import digest, files_digest

        key = digest("outputs", art.backend, art.precision, files_digest(Path(art.root), art.files), batches,
                     art.details.get("runtime_options"))
        cached = self.cache.get_arrays("outputs", key, f"outputs {art.key}")
        if cached is not None:
            return cached
        outputs = run_all(backends.get(art.backend).load(art, threads), batches)
        self.cache.put_arrays("outputs", key, outputs)
        return outputs

    def _measurement_key(self, stage: str, arts: dict[str, Artifact], *parts: Any) -> str:
        from edgekit.cache import digest, files_digest, host_identity

        contents = sorted((k, a.backend, files_digest(Path(a.root), a.files)) for k, a in arts.items())
        return digest(stage, contents, host_identity(), *parts)

    def timing(self, timed: dict[str, Artifact], feeds: dict[str, np.ndarray], settings: ProfileSettings,
               threads: int) -> dict[str, Latency]:
        key = self._measurement_key("timing", timed, feeds, dataclasses.asdict(settings), threads)
        cached = None if self.remeasure else self.cache.get_json("timing", key, "timing")
        if cached is not None:
            return {k: Latency(**v) for k, v in cached.items()}
        with progress() as bar:
            bar.add_task("profiling (interleaved, own process)", total=None)
            latencies = LocalMeasurer(threads).measure(timed, feeds, settings)
        self.cache.put_json("timing", key, {k: v.to_dict() for k, v in latencies.items()})
        return latencies

    def memory(self, art: Artifact, threads: int, feeds: dict[str, np.ndarray]) -> float | None:
        key = self._measurement_key("memory", {art.key: art}, feeds, threads)
        cached = None if self.remeasure else self.cache.get_json("memory", key, f"memory {art.key}")
        if cached is not None:
            return cached["mb"]
        mb = peak_memory_mb(art, threads, feeds)
        if mb is not None:
            self.cache.put_json("memory", key, {"mb": mb})
        return mb

    def node_times(self, reference: Artifact, feeds: dict[str, np.ndarray], threads: int) -> dict[str, float]:
        from edgekit.profiling.timing import onnxruntime_node_times

        key = self._measurement_key("node-times", {"reference": reference}, feeds, threads)
        cached = None if self.remeasure else self.cache.get_json("node-times", key, "per-layer times")
        if cached is not None:
            return cached
        times = onnxruntime_node_times(reference.entry_path, feeds, threads)
        self.cache.put_json("node-times", key, times)
        return times


def _versions(*modules: str) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for m in modules:
        try:
            out[m] = metadata.version(m)
        except metadata.PackageNotFoundError:
            out[m] = None
    return out


def task_guide(spec: ModelSpec, validation: Any, settings: TaskSettings | None) -> TaskGuide | None:
    """What --task tells compression: a detector's decoded layout (the loss reads its boxes and scores) and the
    task's metric on the validation data (against the labels, or the teacher's outputs) to judge and stop by.
    Only for detect and segment, the dense outputs whose teacher fit says little; a classifier's accuracy or
    top-1 agreement is already its task figure."""
    from edgekit.compress.detect_distill import DETECT_LAYOUTS
    from edgekit.compress.stage import TaskGuide
    from edgekit.tasks.evaluator import resolve_task

    if settings is None or settings.task not in ("detect", "segment"):
        return None
    layout = None
    if settings.task == "detect":
        from edgekit.tasks.decoders import guess_decoder
        from edgekit.tasks.detect_eval import input_hw

        name = settings.decoder or guess_decoder([list(o.shape) for o in spec.outputs], input_hw(spec, validation))
        layout = name if name in DETECT_LAYOUTS else None

    def scorer_for(teacher_outputs: list[np.ndarray]) -> Any:
        evaluator, _ = resolve_task(spec, validation, settings, teacher_outputs)
        if evaluator is None:
            return None
        return lambda outputs: (evaluator.metric, evaluator.score(outputs).value / 100)

    return TaskGuide(layout, scorer_for, key=f"{dataclasses.asdict(settings)}|{layout}")


def compress_model(spec: ModelSpec, target: Target, c: CompressOptions, preprocess: Preprocess | None,
              data: DataSplit, work: Path, stages: CachedStages, task: TaskSettings | None = None
              ) -> tuple[ModelSpec, dict[str, Any]]:
    """Prune / distill, then ingest the result: later stages verify quantization against the compressed
    FP32 model, and the accuracy change of compression itself is checked against the original."""
    from edgekit.cache import digest
    from edgekit.compress.stage import compress
    from edgekit.data import open_source

    train = None
    if c.train:
        src = open_source(c.train, spec, preprocess, "training")
        train = src.load(np.arange(src.count), spec, "training")
    folder = work / "compress"
    settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("train", "checkpoint")}
    guide = task_guide(spec, data.validation, task)
    key = digest("compress", spec.sha256, settings, stages.data(train), stages.data(data.validation),
                 target.channel_multiple, _versions("torch", "torch-pruning"), guide.key if guide else "")
    report = stages.cache.get_tree("compress", key, folder, "compression (prune/distill)")
    if report is None:
        folder.mkdir()
        result = compress(spec, target, c, train, data.validation, folder, guide=guide)
        report = result.report
        stages.cache.put_tree("compress", key, folder, ["model.onnx"], report)
    compressed = stages.ingest(str(folder / "model.onnx"), work / "compressed", {}, None)
    note(f"compressed: {spec.macs / 1e6:.1f} -> {compressed.macs / 1e6:.1f} M MACs, "
         f"{spec.params:,} -> {compressed.params:,} parameters")
    return compressed, report
