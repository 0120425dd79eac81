"""ONNX Runtime Mobile backend: the ONNX the onnxruntime backend builds, converted to ORT format
(`model.ort`) by onnxruntime's own converter, plus the reduced-operator config a custom minimal
ONNX Runtime build for Android/iOS takes (`--include_ops_by_config`).

Choices (measured on the bundled model with onnxruntime 1.32):
- Optimization style 'Runtime', target platform 'arm'. 'Fixed' bakes the build machine's CPU-EP
  fusions into the file (Conv+Relu -> com.microsoft FusedConv, Q/DQ -> QLinearConv in NHWC), which
  NNAPI, CoreML and XNNPACK cannot take. 'Runtime' saves only basic (hardware-independent)
  optimizations in the graph and records the CPU-EP fusions as saved runtime optimizations that the
  device replays for the nodes no other EP claimed, when the app sets
  `session.enable_saved_runtime_optimizations=1` (full or extended minimal builds). Without replay
  an INT8 .ort runs DequantizeLinear -> float Conv -> QuantizeLinear: 4x slower here.
- No FP16: ORT format is a serialized, already-partitioned graph, and the converter bakes the build
  machine's missing FP16 CPU kernels into it (29 Cast nodes around float kernels on x86), so the file
  would never use an ARM device's FP16 kernels. FP32 and INT8 (static Q/DQ) convert cleanly.
- No type reduction: the op-level config already drops the unused kernels; type reduction would also
  need `--enable_reduced_operator_type_support` and ties the build to the exact tensor types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekit.backends import onnxruntime as ort_backend
from edgekit.backends import register
from edgekit.backends.base import Artifact, Backend, OpIssue
from edgekit.errors import BadInput, EdgekitError

if TYPE_CHECKING:
    from edgekit.data import Dataset
    from edgekit.ingest import ModelSpec
    from edgekit.planning.types import ArtifactPlan

ENTRY = "model.ort"
CONFIG = "required_operators.config"
OPTIMIZATION_STYLE = "Runtime"
TARGET_PLATFORM = "arm"  # QDQIsInt8Allowed as on ARM, and no x86-only NCHWc layout
# Session config the app sets to replay the saved runtime optimizations (the CPU-EP fusions).
RUNTIME_OPTIONS = {"session.enable_saved_runtime_optimizations": "1"}


def reduced_build_command(ort_version: str) -> str:
    return (f"in an onnxruntime checkout at tag v{ort_version}: ./build.sh --config MinSizeRel --android "
            "--android_abi arm64-v8a --android_sdk_path $ANDROID_HOME --android_ndk_path $ANDROID_NDK_HOME "
            f"--build_java --minimal_build extended --include_ops_by_config {CONFIG} --skip_tests "
            "(iOS: --ios --use_xcode --apple_deploy_target VERSION --use_coreml instead of the Android flags; "
            "add --use_nnapi or --use_xnnpack for those EPs; 'extended' keeps the replay of saved runtime "
            "optimizations and the EPs)")


def read_config(path: Path) -> dict[str, list[str]]:
    """Domain -> op types a reduced-operator config lists, parsed by onnxruntime's own parser
    (the one `build.sh --include_ops_by_config` uses)."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(path), False)
    return {domain: sorted({op for ops in by_opset.values() for op in ops})
            for domain, by_opset in sorted(required.items())}


class OrtMobileSession(ort_backend.OrtSession):
    """The .ort file in this machine's (full) ONNX Runtime, CPU EP, as the app runs it: saved runtime
    optimizations replayed (and the ONNX Runtime backend's shared thread pool, when its timing process
    set one up: the reference is always timed beside this artifact)."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__(path, threads, config={"session.load_model_format": "ORT", **RUNTIME_OPTIONS})

    def run_intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
        # An ORT format session cannot add graph outputs; the ONNX it was converted from can.
        raise EdgekitError("an ORT format model cannot expose intermediate tensors: run `edgekit debug ... "
                           "--backend onnxruntime` at the same precision (the graph before conversion)")


@register
class OrtMobileBackend(Backend):
    name = "ort-mobile"
    precisions = ("fp32", "int8")
    requires = ("onnxruntime", "flatbuffers")  # flatbuffers: the converter reads the .ort to write the config
    install_hint = "pip install onnxruntime"
    runtime_distributions = ("onnxruntime",)
    device_modules = ("onnxruntime", "numpy")
    verifies_under_emulation = True
    emulation_fallbacks = ort_backend.OnnxRuntimeBackend.emulation_fallbacks
    # The ladder's 7-bit-weights retry: the artifact is verified on this host's kernels, and x86 u8*s8 without
    # VNNI saturates (an AVX2 host lost 2.25 points of accuracy that 7-bit weights kept); harmless on ARM.
    int8_reduce_range = True

    def versions(self) -> dict[str, str]:
        return {d: metadata.version(d) for d in ("onnxruntime", "onnx")}

    def unsupported_nodes(self, model: onnx.ModelProto) -> list[OpIssue]:
        # The converter loads the model into the CPU EP: the same kernels decide.
        issues = ort_backend.OnnxRuntimeBackend().unsupported_nodes(model)
        return [dataclasses.replace(i, backend=self.name) for i in issues]

    def export(self, spec: ModelSpec, plan: ArtifactPlan, calibration: Dataset | None, root: Path) -> Artifact:
        if plan.precision not in self.precisions:
            raise BadInput(f"{self.name} cannot build precision {plan.precision} (it builds "
                           f"{', '.join(self.precisions)})")
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="edgekit-ort-mobile-") as tmp:
            onnx_dir = Path(tmp) / "onnx"
            onnx_dir.mkdir()
            # Exactly the ONNX (and INT8 quantization) the onnxruntime backend makes.
            source = ort_backend.OnnxRuntimeBackend().export(
                spec, dataclasses.replace(plan, backend=ort_backend.OnnxRuntimeBackend.name), calibration, onnx_dir)
            ort_file, config_file = self._convert(source.entry_path, Path(tmp) / "ort")
            shutil.move(str(ort_file), root / ENTRY)
            config_text = config_file.read_text()
        # The converter's header names its temporary files; say what the config is for instead.
        body = [ln for ln in config_text.splitlines() if ln.strip() and not ln.startswith("#")]
        header = [f"# Operators {ENTRY} needs (ONNX Runtime {ort.__version__}, optimization style "
                  f"{OPTIMIZATION_STYLE}: the saved graph plus the ops its runtime optimizations create).",
                  f"# Reduced ONNX Runtime: build.sh --minimal_build extended --include_ops_by_config {CONFIG}"]
        (root / CONFIG).write_text("\n".join(header + body) + "\n")
        operators = read_config(root / CONFIG)
        details: dict[str, Any] = {
            **source.details,
            "converter": "onnxruntime.tools.convert_onnx_models_to_ort",
            "ort_version": ort.__version__,
            "optimization_style": OPTIMIZATION_STYLE,
            "optimization_level": os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all"),
            "optimization_style_why": "portable graph: basic optimizations only, CPU-EP fusions saved as runtime "
                                      "optimizations, so NNAPI/CoreML/XNNPACK can claim nodes on the device",
            "target_platform": TARGET_PLATFORM,
            "type_reduction": False,
            "config": CONFIG,
            "operators": operators,
            "runtime_options": dict(RUNTIME_OPTIONS),
            "reduced_build": reduced_build_command(ort.__version__),
            "app_runtime": (f"onnxruntime-android (Android) or onnxruntime-c / onnxruntime-objc (iOS) >= "
                            f"{ort.__version__}, which run ORT format models; or the reduced build above from "
                            f"the same release. The retired onnxruntime-mobile packages (last 1.18) run only "
                            f"their fixed op set"),
        }
        notes = [*source.notes,
                 f"ORT format for ONNX Runtime >= {ort.__version__}; set session config "
                 + ", ".join(f"{k}={v}" for k, v in RUNTIME_OPTIONS.items())
                 + " in the app to replay the CPU fusions (INT8 runs Q/DQ in float without it)"]
        return Artifact(self.name, plan.precision, str(root), [ENTRY, CONFIG], ENTRY, details, notes)

    def load(self, artifact: Artifact, threads: int) -> OrtMobileSession:
        return OrtMobileSession(artifact.entry_path, threads)

    @staticmethod
    def _convert(model: Path, out: Path) -> tuple[Path, Path]:
        """onnxruntime's converter (as `python -m onnxruntime.tools.convert_onnx_models_to_ort
        --optimization_style Runtime --target_platform arm`), its chatter kept off stdout."""
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(model, output_dir=out,
                                           optimization_styles=[OptimizationStyle[OPTIMIZATION_STYLE]],
                                           target_platform=TARGET_PLATFORM, enable_type_reduction=False)
        except Exception as e:
            tail = " ".join(log.getvalue().split()[-40:])
            raise EdgekitError(f"onnxruntime convert_onnx_models_to_ort failed: {type(e).__name__}: {e} "
                               f"({tail})") from None
        # Found by suffix: the converter's names carry the style and ORT_CONVERT_..._OPTIMIZATION_LEVEL.
        ort_files, configs = sorted(out.glob("*.ort")), sorted(out.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise EdgekitError(f"onnxruntime convert_onnx_models_to_ort wrote {[p.name for p in out.iterdir()]}, "
                               "expected one .ort and one .config")
        return ort_files[0], configs[0]
