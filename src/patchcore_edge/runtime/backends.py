"""Feature backends: a normalised image batch in, the patch-feature grid out. No torch here, ever."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..bundle import BundleError


class FeatureBackend(Protocol):
    name: str
    max_batch: Optional[int]

    def features(self, batch: np.ndarray) -> np.ndarray:
        """float32 [B, 3, crop, crop] -> float32 [B, h, w, D]."""
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

    def __init__(self, onnx_path: Path, input_name: str, output_name: str, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One inference at a time per session: parallelism goes inside the operators.
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
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
        if input_name not in inputs or output_name not in outputs:
            raise BundleError(f"{onnx_path}: expected input {input_name!r} and output {output_name!r}, the model has "
                              f"{inputs} -> {outputs}; re-export the bundle")
        self.input_name, self.output_name = input_name, output_name
        provider = self.session.get_providers()[0]
        self.name = "onnxruntime:" + provider.replace("ExecutionProvider", "").lower()
        self.run_batch = CPU_RUN_BATCH if provider == "CPUExecutionProvider" else None

    def features(self, batch: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(batch, np.float32)
        step = self.run_batch or max(1, images.shape[0])
        outputs = [self.session.run([self.output_name], {self.input_name: images[start:start + step]})[0]
                   for start in range(0, images.shape[0], step)]
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")


def open_backend(bundle_dir: Path, manifest: Dict[str, Any], backend: str = "auto",
                 threads: Optional[int] = None) -> Tuple[FeatureBackend, str]:
    """The feature backend asked for, and a one-line note of why it was chosen."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    features = manifest["features"]
    if backend in ("auto", "tensorrt"):
        from .. import trt

        engine, reason = trt.find_engine(bundle_dir, manifest)
        if engine is not None:
            return trt.TensorRTFeatures(bundle_dir / engine["file"], manifest), f"TensorRT engine {engine['file']}"
        if backend == "tensorrt":
            raise BundleError(f"{bundle_dir}: no usable TensorRT engine ({reason})")
        note = f"ONNX Runtime ({reason})"
    else:
        note = "ONNX Runtime (asked for)"
    ort_backend = OnnxRuntimeFeatures(bundle_dir / features["onnx_file"], features["input_name"],
                                      features["output_name"], threads=threads)
    return ort_backend, note


def available_backends() -> List[str]:
    import onnxruntime as ort

    return ["onnxruntime:" + p for p in ort.get_available_providers()]
