"""Feature backends: a normalised image batch in, every output of the bundle's network out, by name. No torch here,
ever: ONNX Runtime, or a TensorRT engine (`trt.TensorRTFeatures`, which has the same `run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..bundle import Bundle, BundleError
from ..cpu import available_cores
from ..devices.engine import find_engine, open_engine
from ..trt import EngineLoadError


class FeatureBackend(Protocol):
    """Runs the bundle's network: a normalised image batch in, every output the method needs, by name."""

    name: str
    max_batch: Optional[int]
    # What the scores depend on, recorded by calibration: the engine file (None for ONNX Runtime) and precision.
    engine_file: Optional[str]
    precision: str

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """float32 [B, 3, H, W] -> {output name: float32 [B, ...]}."""
        ...

    def close(self) -> None:
        ...


# On the CPU provider a batch runs one image at a time: batching gains nothing there (2 cores: 2.2 ms per image
# in runs of 1, 2.5 in one run of 8, whose activations no longer fit the caches) while the activation memory
# grows with the run (a batch-8 process peaks ~80 MB higher; benchmarks/results/runtime.md).
CPU_RUN_BATCH = 1


class OnnxRuntimeFeatures:
    """features.onnx through ONNX Runtime, on the best execution provider present (CUDA/TensorRT EPs if any)."""

    max_batch: Optional[int] = None
    engine_file: Optional[str] = None
    precision = "fp32"  # features.onnx is a float32 graph

    def __init__(self, onnx_path: Path, input_name: str, output_names: Sequence[str], threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None,
                 shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
        import onnxruntime as ort

        refuse_external_data(onnx_path)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One inference at a time per session: parallelism goes inside the operators.
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT's workers busy-wait between operators (which keeps the features call fast) and, by default, for a
        # while after the run too: on a small CPU they then steal the cores from the search and map stages that
        # follow. Stopping the spin at the end of each run keeps both (2 cores, batch 1: features + search +
        # score + map 15.3 -> 10.3 ms; spinning off altogether slows the features call, 2.1 -> 2.7 ms;
        # benchmarks/results/runtime.md). Versions without the key ignore it.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in available]
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        except Exception as error:  # onnxruntime raises its own exception types for broken models
            raise BundleError(f"{onnx_path}: ONNX Runtime cannot load it ({error}); re-export the bundle") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in output_names if name not in outputs]
        if input_name not in inputs or missing:
            raise BundleError(f"{onnx_path}: expected input {input_name!r} and outputs {list(output_names)}, the "
                              f"model has {inputs} -> {outputs}; re-export the bundle")
        if shapes:
            declared = {i.name: i.shape for i in self.session.get_inputs()}
            declared.update({o.name: o.shape for o in self.session.get_outputs()})
            for name, expected in shapes.items():
                check_shape(onnx_path, name, declared.get(name), expected)
        self.input_name, self.output_names = input_name, list(output_names)
        provider = self.session.get_providers()[0]
        self.name = "onnxruntime:" + provider.replace("ExecutionProvider", "").lower()
        self.run_batch = CPU_RUN_BATCH if provider == "CPUExecutionProvider" else None

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        images = np.ascontiguousarray(batch, np.float32)
        step = self.run_batch or max(1, images.shape[0])
        runs = [self.session.run(self.output_names, {self.input_name: images[start:start + step]})
                for start in range(0, images.shape[0], step)]
        return {name: np.asarray(runs[0][i] if len(runs) == 1 else np.concatenate([r[i] for r in runs]),
                                 dtype=np.float32)
                for i, name in enumerate(self.output_names)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")

# How an ONNX TensorProto names an external data file: field 13 (external_data) holding the entry
# {key: "location", value: FILE}. onnx is not a runtime dependency, so the bytes are scanned for it.
_EXTERNAL_LOCATION = b"\x0a\x08location"


def refuse_external_data(onnx_path: Path) -> None:
    """A bundle's network keeps its weights inside features.onnx: a weight moved to another file (which the
    manifest's sha256 list does not cover) would change the scores unnoticed, so external data is refused."""
    try:
        data = onnx_path.read_bytes()
    except OSError as error:
        raise BundleError(f"{onnx_path}: cannot read it ({error.strerror or error})") from None
    at = data.find(_EXTERNAL_LOCATION)
    while at >= 2:
        if data[at - 2] == 0x6A:  # the external_data field tag, then the entry's length, then the key
            raise BundleError(f"{onnx_path}: the model keeps weights in an external data file; bundles must hold "
                              "every weight inside features.onnx (covered by its sha256): re-export the bundle")
        at = data.find(_EXTERNAL_LOCATION, at + 1)


def check_shape(onnx_path: Path, name: str, declared: Any, expected: Tuple[int, ...]) -> None:
    """The network's declared shape of `name` (batch dimension first, then `expected`) must match the manifest;
    symbolic dimensions are not compared."""
    if declared is None:
        return
    dims = list(declared)[1:]
    if len(dims) != len(expected) or any(isinstance(d, int) and d != e for d, e in zip(dims, expected)):
        raise BundleError(f"{onnx_path}: {name} has shape {list(declared)}, the manifest says "
                          f"[B, {', '.join(map(str, expected))}]; the bundle is inconsistent: re-export it")


def open_backend(bundle: Bundle, backend: str = "auto", threads: Optional[int] = None
                 ) -> Tuple[FeatureBackend, str]:
    """The feature backend asked for, and a one-line note of why it was chosen."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    features = bundle.features
    if backend in ("auto", "tensorrt"):
        engine, reason = find_engine(bundle)
        if engine is not None:
            try:
                return open_engine(bundle, engine), f"TensorRT engine {engine['file']}"
            except EngineLoadError as error:  # names the engine file and the tensor that does not match
                raise BundleError(str(error)) from None
        if backend == "tensorrt":
            raise BundleError(f"{bundle.path}: no usable TensorRT engine ({reason})")
        note = f"ONNX Runtime ({reason})"
    else:
        note = "ONNX Runtime (asked for)"
    spec = bundle.input_spec
    shapes: Dict[str, Tuple[int, ...]] = {features.input_name: (3, spec.height, spec.width),
                                          **features.output_shapes}
    ort_backend = OnnxRuntimeFeatures(bundle.path / features.onnx_file, features.input_name, features.outputs,
                                      threads=threads, shapes=shapes)
    return ort_backend, note


def available_backends() -> List[str]:
    import onnxruntime as ort

    return ["onnxruntime:" + p for p in ort.get_available_providers()]
