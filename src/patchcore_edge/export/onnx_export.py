"""Export the patch-feature extractor to ONNX and check ONNX Runtime against torch.

The model: input `image` float32 [batch, 3, crop, crop] (normalised), output `features` float32
[batch, h, w, D] (channels last), batch dynamic, everything else static. One self-contained file (weights
inside; the largest backbone, wide_resnet50_2 cut after layer3, is 106 MB, far below protobuf's 2 GB limit).

The classic TorchScript exporter (`dynamo=False`) is used: the dynamo exporter needs `onnxscript`, which the
export extra does not install, and the traced graph of this small feed-forward model is exact.

Parity tolerance: `max |onnx - torch| <= rtol * max |torch| + 1e-6` over the whole output, relative to the
output's scale because that scale depends on backbone and weights (real mobilenet_v2 features reach ~2, an
untrained network's ~1e-3, where a fixed absolute bound would accept a 10% error). rtol is 1e-4 on CPU
(float32 kernels differ only in summation order: measured 4e-7 to 8e-7 relative on the three backbones) and
1e-2 on GPU providers, whose convolutions may run in TF32 (10-bit mantissa) on Ampere and newer GPUs. The 1e-6
floor only keeps an all-zero output from demanding exact equality. A wrong operator (padding, interpolation,
layout) or damaged weights give differences of the order of the features themselves, far above both.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from ..preprocess import InputSpec
from ..errors import FileProblem

INPUT_NAME = "image"
OUTPUT_NAME = "features"
BATCH_AXIS = "batch"
DEFAULT_OPSET = 17
CPU_RTOL = 1e-4
GPU_RTOL = 1e-2
ATOL = 1e-6
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxModelError(FileProblem):
    """An ONNX file that cannot be loaded or does not follow the features.onnx contract."""



@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs torch on one batch; max_rel is max_abs / max |torch| (relative to the output scale)."""

    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    provider: str  # the provider with the largest difference relative to its tolerance
    providers: Tuple[str, ...]
    reference_max: float
    batch: int
    output: str = OUTPUT_NAME  # the output with that difference

    def describe(self) -> str:
        verdict = "within" if self.ok else "EXCEEDS"
        return (f"max |onnx - torch| = {self.max_abs:.3e} (relative {self.max_rel:.3e}) in output "
                f"{self.output!r} on {self.batch} "
                f"image(s) with {self.provider}, {verdict} the tolerance {self.tolerance:.3e}")


class OnnxParityError(Exception):
    """ONNX Runtime's output differs from torch's by more than the tolerance (or has another shape)."""

    def __init__(self, message: str, report: Optional[ParityReport] = None) -> None:
        self.report = report
        super().__init__(message)


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def export_onnx(extractor: torch.nn.Module, path: Union[str, os.PathLike[str]], spec: InputSpec,
                opset: int = DEFAULT_OPSET, output_names: Sequence[str] = (OUTPUT_NAME,)) -> Path:
    """Write `extractor` as a single-file ONNX model with a dynamic batch axis; returns the path.

    `extractor` returns one tensor, or a tuple of tensors named `output_names` in order (methods whose scorer
    needs more than the patch grid). The file is written beside its final name and renamed into place: a failed
    export leaves no partial file.
    """
    names = list(output_names)
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    extractor = extractor.eval()
    device = _module_device(extractor)
    # Batch 2 while tracing: nothing in the graph may specialise on a batch of one.
    example = torch.zeros(2, 3, spec.height, spec.width, device=device)
    with torch.no_grad():
        produced = extractor(example)
    tensors = list(produced) if isinstance(produced, (tuple, list)) else [produced]
    if len(tensors) != len(names):
        raise OnnxModelError(str(target), f"the network returns {len(tensors)} outputs, {len(names)} names given")
    expected = [tuple(int(v) for v in t.shape[1:]) for t in tensors]
    try:
        with warnings.catch_warnings():
            # The classic exporter announces its own deprecation; that is a choice made above, not news.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            # Its note that a strided Slice stayed unfolded: fold_constant_nodes folds what is constant and the
            # export's parity check compares the graph with torch, so to a user the note is only noise.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                extractor, (example,), str(partial), input_names=[INPUT_NAME], output_names=names,
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, **{n: {0: BATCH_AXIS} for n in names}},
                opset_version=opset,
                do_constant_folding=True, dynamo=False)
        model = fold_constant_nodes(onnx.load(str(partial)))
        for position, shape in enumerate(expected):
            pin_output_shape(model, shape, position)
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(partial), save_as_external_data=False)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


# Only shape arithmetic is folded: nodes whose inputs are all constant and whose outputs stay this small.
_FOLD_MOST_VALUES = 4096


def fold_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace nodes computed from constants alone by their values (initializers), where torch's folding stops.

    torch exports EfficientNet-Lite's static "same" padding as a Pad whose pads come from a chain of Concat,
    Reshape, Slice (step -1) and Transpose on constants, which its own folding skips (steps other than 1): ONNX
    shape inference then cannot give the Pad's output a shape, and neither can it any tensor downstream, so the
    activation-memory analysis (`devices fit`) and TensorRT see dynamic shapes where all are static. Evaluated
    with ONNX's reference implementation, node by node in graph order.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kept, folded = [], []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in known for name in inputs)
                                          and all(known[name].size <= _FOLD_MOST_VALUES for name in inputs)):
            try:
                values = ReferenceEvaluator(node).run(None, {name: known[name] for name in inputs})
            except Exception:  # an op the reference cannot run: keep the node as it is
                kept.append(node)
                continue
            if all(getattr(value, "size", _FOLD_MOST_VALUES + 1) <= _FOLD_MOST_VALUES for value in values):
                for name, value in zip(node.output, values):
                    known[name] = value
                    folded.append(numpy_helper.from_array(value, name))
                continue
        kept.append(node)
    if not folded:
        return model
    used = {name for node in kept for name in node.input} | {output.name for output in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(init for init in folded if init.name in used)
    return model


def pin_output_shape(model: onnx.ModelProto, grid_and_dim: Tuple[int, ...], position: int = 0) -> None:
    """Declare an output as [batch, h, w, D]; the tracer leaves h, w, D symbolic (from its Shape ops)."""
    output = model.graph.output[position]
    dims = output.type.tensor_type.shape.dim
    if len(dims) != 1 + len(grid_and_dim):
        raise OnnxModelError("<export>", f"output has rank {len(dims)}, expected {1 + len(grid_and_dim)}")
    dims[0].ClearField("dim_value")
    dims[0].dim_param = BATCH_AXIS
    for dim, value in zip(list(dims)[1:], grid_and_dim):
        dim.ClearField("dim_param")
        dim.dim_value = value


def _available_providers() -> List[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [CPU_PROVIDER]
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    return chosen


def _rtol(provider: str) -> float:
    return CPU_RTOL if provider == CPU_PROVIDER else GPU_RTOL


def _run_onnx(onnx_path: Path, batch: np.ndarray, provider: str, threads: Optional[int],
              output_names: Sequence[str]) -> Dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable models
        raise OnnxModelError(onnx_path, f"ONNX Runtime cannot load it ({str(error).strip()[:300]})") from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or any(name not in outputs for name in output_names):
        raise OnnxModelError(onnx_path, f"expected input {INPUT_NAME!r} and outputs {list(output_names)}, the "
                                        f"model has inputs {inputs} and outputs {outputs}")
    try:
        values = session.run(list(output_names), {INPUT_NAME: batch})
    except Exception as error:  # a model that loads but cannot run this input (wrong input size, say)
        raise OnnxModelError(onnx_path, f"ONNX Runtime failed on a batch of shape {batch.shape} "
                                        f"({str(error).strip()[:300]})") from None
    return {name: np.asarray(value) for name, value in zip(output_names, values)}


def check_onnx_parity(extractor: torch.nn.Module, onnx_path: Union[str, os.PathLike[str]],
                      batch: np.ndarray, providers: Optional[Sequence[str]] = None, *,
                      threads: Optional[int] = None, raise_on_failure: bool = True,
                      output_names: Sequence[str] = (OUTPUT_NAME,)) -> ParityReport:
    """Run `batch` (float32 [B, 3, H, W], normalised) through torch and ONNX Runtime and compare every output.

    The module returns one tensor or a tuple named `output_names` in order; each output is held to the
    tolerance relative to its own scale (a global feature and a patch grid differ in magnitude). providers:
    ONNX Runtime execution providers to check, each on its own; default CPU, plus CUDA when available. Raises
    OnnxParityError (with the numbers) when an output exceeds its tolerance on a provider, unless
    raise_on_failure is False, in which case the report says ok=False. The report is the worst output.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise OnnxModelError(path, "ONNX file not found")
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[0] < 1:
        raise ValueError(f"expected a batch of shape [B, 3, H, W], got {batch.shape}")
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    names = list(output_names)

    extractor = extractor.eval()
    with torch.no_grad():
        returned = extractor(torch.from_numpy(batch).to(_module_device(extractor)))
    tensors = list(returned) if isinstance(returned, (tuple, list)) else [returned]
    if len(tensors) != len(names):
        raise ValueError(f"the network returns {len(tensors)} outputs, {len(names)} names given")
    references = {name: t.cpu().numpy().astype(np.float64) for name, t in zip(names, tensors)}
    scales = {name: float(np.abs(r).max()) for name, r in references.items()}

    chosen = list(providers) if providers is not None else _available_providers()
    if not chosen:
        raise ValueError("no ONNX Runtime provider to check")
    # (provider, output) -> (max |difference|, tolerance)
    results: Dict[Tuple[str, str], Tuple[float, float]] = {}
    for provider in chosen:
        got = _run_onnx(path, batch, provider, threads, names)
        for name in names:
            if got[name].shape != references[name].shape:
                raise OnnxParityError(f"{path}: ONNX Runtime ({provider}) returns shape {got[name].shape} for "
                                      f"{name!r}, torch {references[name].shape}")
            difference = np.abs(got[name].astype(np.float64) - references[name])
            # NaN in either output must fail the check, which a plain max() would hide.
            max_abs = float(difference.max()) if np.isfinite(difference).all() else float("inf")
            results[(provider, name)] = (max_abs, _rtol(provider) * scales[name] + ATOL)

    worst = max(results, key=lambda key: results[key][0] / results[key][1])
    max_abs, tolerance = results[worst]
    reference_max = scales[worst[1]]
    report = ParityReport(max_abs=max_abs, max_rel=max_abs / reference_max if reference_max > 0 else max_abs,
                          tolerance=tolerance, ok=all(d <= t for d, t in results.values()), provider=worst[0],
                          providers=tuple(chosen), reference_max=reference_max, batch=int(batch.shape[0]),
                          output=worst[1])
    if raise_on_failure and not report.ok:
        raise OnnxParityError(f"{path}: {report.describe()}", report)
    return report
