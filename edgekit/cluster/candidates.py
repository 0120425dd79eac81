"""A round's candidates as Ray tasks: the model, data and verifier go into the object store once per round; each
task evaluates one ArtifactPlan exactly as the local path does (pipeline.candidates.evaluate_candidate) in a
node-local folder and returns the same CandidateResult with the artifact's files as bytes, which the driver
unpacks into the package. Tasks are not retried by Ray (max_retries=0): the executor resubmits a task whose worker
or node died, up to MAX_ATTEMPTS, and records every attempt, so the run's record says what was retried and where."""

from __future__ import annotations

import io
import os
import platform
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.cluster.connection import connect, ray_module, system_errors
from edgekit.console import note
from edgekit.errors import EdgekitError
from edgekit.pipeline.candidates import CandidateContext, CandidateResult, evaluate_candidate
from edgekit.planning.types import ArtifactPlan

MAX_ATTEMPTS = 3
WAIT_S = 5.0


@dataclass
class RemoteCandidate:
    """What one task sends back: the result (artifact root relative), the artifact's files, and where it ran."""

    result: CandidateResult
    files: bytes
    sensitivity: dict[str, dict[str, float]]
    reused: list[str]
    node: str
    host: str
    pid: int
    started: float
    finished: float


@dataclass
class _Payload:
    """A round's shared inputs: the candidate context (its paths are the driver's) and the model's bytes."""

    ctx: CandidateContext
    onnx: bytes
    onnx_name: str
    train: bytes | None = None  # --train (a file or a folder) as a tar: a remote node cannot see the driver's path


def _pack(root: Path, key: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in (key, f"debug/{key}.json"):
            if (root / rel).exists():
                tar.add(root / rel, arcname=rel)
    return buf.getvalue()


def _pack_path(path: Path) -> bytes:
    """A file or a folder (its plain files, links left out) as a tar whose top entry is the path's name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        for f in files:
            tar.add(f, arcname=str(Path(path.name) / f.relative_to(path)) if f != path else path.name,
                    recursive=False)
    return buf.getvalue()


def _unpack(data: bytes, root: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = tar.getmembers()
        for m in members:  # edgekit's own bytes, still checked: plain files and folders under root only
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise EdgekitError(f"a cluster task sent back an unsafe path: {m.name}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the stdlib check where it has one
        tar.extractall(root, members=members, **safe)


def _evaluate(payload: _Payload, ap: ArtifactPlan) -> RemoteCandidate:
    """On a worker: the candidate in a node-local folder, the model written there from the object store."""
    import ray

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="edgekit-task-"))
    try:
        ctx = payload.ctx
        onnx_path = work / payload.onnx_name
        onnx_path.write_bytes(payload.onnx)
        spec = replace(ctx.spec, onnx_path=str(onnx_path))
        ctx.verifier.spec = spec
        if ctx.verifier.isa is not None:
            ctx.verifier.isa.on_this_machine()
        (work / "pkg").mkdir()
        (work / "work").mkdir()
        train = ctx.train
        if payload.train is not None and ctx.train:
            (work / "train").mkdir()
            _unpack(payload.train, work / "train")
            train = str(work / "train" / Path(ctx.train).name)
        ctx = replace(ctx, spec=spec, root=work / "pkg", work=work / "work", train=train)
        before = {b: dict(t) for b, t in (ctx.plan.sensitivity if ctx.plan else {}).items()}
        result = evaluate_candidate(ctx, ap)
        if result.artifact is not None:
            result.artifact.root = result.artifact.key  # relative: the driver puts it under its package folder
        after = dict(ctx.plan.sensitivity) if ctx.plan else {}
        changed = {b: t for b, t in after.items() if before.get(b) != t}
        return RemoteCandidate(result, _pack(work / "pkg", result.key), changed,
                               list(ctx.verifier.stages.cache.reused), ray.get_runtime_context().get_node_id(),
                               platform.node(), os.getpid(), started, time.time())
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class RayExecutor:
    """Candidates on a Ray cluster; `record()` is the run's record (nodes, tasks, retries)."""

    address: str
    tasks: list[dict[str, Any]] = field(default_factory=list)
    retried: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def connect(cls, address: str) -> RayExecutor:
        connect(address)
        return cls(address)

    def map(self, ctx: CandidateContext, plans: list[ArtifactPlan]) -> list[CandidateResult]:
        ray = ray_module()
        spec = ctx.spec
        payload = ray.put(_Payload(ctx, Path(spec.onnx_path).read_bytes(), Path(spec.onnx_path).name,
                                   _pack_path(Path(ctx.train)) if ctx.train else None))
        remote = ray.remote(num_cpus=1, max_retries=0)(_evaluate)
        pending = {remote.remote(payload, ap): (i, ap, 1) for i, ap in enumerate(plans)}
        done: dict[int, RemoteCandidate] = {}
        system = system_errors(ray)
        try:
            self._collect(ray, remote, payload, pending, done, system)
        finally:
            for ref in pending:  # the driver stopped (an error, ^C): nothing of this round keeps running
                ray.cancel(ref, force=True)
        return self._unpacked(ctx, plans, done)

    def _collect(self, ray: Any, remote: Any, payload: Any, pending: dict[Any, tuple[int, ArtifactPlan, int]],
                 done: dict[int, RemoteCandidate], system: tuple[type[BaseException], ...]) -> None:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            if not ready and not any(n.get("Alive") and (n.get("Resources") or {}).get("CPU", 0) >= 1
                                     for n in ray.nodes()):
                # A task no live node can run waits forever in Ray: said, not waited for.
                raise EdgekitError(f"no live node of cluster {self.address} has a CPU for the candidates (the "
                                   "nodes left, or were started with --num-cpus=0); add a worker with "
                                   "`ray start --address HEAD` or run without --cluster")
            for ref in ready:
                i, ap, attempt = pending.pop(ref)
                try:
                    done[i] = ray.get(ref)
                except system as e:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    self.retried.append({"key": f"{ap.backend}-{ap.precision}", "attempt": attempt, "error": why})
                    if attempt >= MAX_ATTEMPTS:
                        raise EdgekitError(f"{ap.backend} {ap.precision}: the cluster lost it {attempt} times ({why})"
                                           ) from None
                    note(f"{ap.backend} {ap.precision}: its worker was lost ({why}); retrying (attempt {attempt + 1})")
                    pending[remote.remote(payload, ap)] = (i, ap, attempt + 1)
                except ray.exceptions.RayTaskError as e:
                    raise e.as_instanceof_cause() from None  # edgekit's own error, as the local path raises it
                except ray.exceptions.RayError as e:  # out of memory, object store full, runtime env...: one line
                    raise EdgekitError(f"{ap.backend} {ap.precision} on the cluster: {type(e).__name__}: "
                                       f"{(str(e).splitlines() or [''])[0]}") from None

    def _unpacked(self, ctx: CandidateContext, plans: list[ArtifactPlan], done: dict[int, RemoteCandidate]
                  ) -> list[CandidateResult]:
        results = []
        for i in range(len(plans)):
            rc = done[i]
            _unpack(rc.files, ctx.root)
            if rc.result.artifact is not None:
                rc.result.artifact.root = str(ctx.root / rc.result.artifact.key)
            if ctx.plan is not None:
                ctx.plan.sensitivity.update(rc.sensitivity)  # as the local ladder does: a backend's table replaced
            ctx.verifier.stages.cache.reused += [r for r in rc.reused if r not in ctx.verifier.stages.cache.reused]
            self.tasks.append({"key": rc.result.key, "node": rc.node, "host": rc.host, "pid": rc.pid,
                               "seconds": round(rc.finished - rc.started, 2)})
            results.append(rc.result)
        return results

    def record(self) -> dict[str, Any] | None:
        ray = ray_module()
        nodes = [{"node": n["NodeID"], "address": n.get("NodeManagerAddress"), "alive": n.get("Alive"),
                  "cpus": n.get("Resources", {}).get("CPU")} for n in ray.nodes()]
        return {"cluster": self.address, "nodes": nodes, "tasks": self.tasks, "retried": self.retried,
                "measured_by": f"this host ({platform.node()}): compared candidates are timed side by side on one "
                               "measurer, never across nodes"}
