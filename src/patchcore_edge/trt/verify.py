"""THE engine check: an engine's outputs (every one), and the image scores they give, against ONNX Runtime on real
images.

Used by export (on the nominal images being exported) and by `engine build` (on the calibration or sample
images, with the bundle's own scoring): an engine is registered only if it passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

from .errors import EngineBuildError
from .runner import OutputTensor, TensorIO

REFERENCE = "onnxruntime CPUExecutionProvider"
# Largest accepted max|f_trt - f_onnx| / max|f_onnx| per precision. FP16 keeps ~3 significant digits per
# operation; INT8 calibration error is larger.
FEATURE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
# Largest accepted relative change of any image score per precision. Thresholds are set on scores, so an
# engine that moves scores by more than this could move decisions.
SCORE_TOLERANCE = {"fp32": 0.005, "fp16": 0.02, "int8": 0.10}

# The network's outputs by name -> one image score per image, as the bundle's method scores them.
ScoreFunction = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class FeatureSource(Protocol):
    def run(self, batch: np.ndarray) -> Mapping[str, np.ndarray]: ...


class EngineScoreError(EngineBuildError):
    """The engine's features are within tolerance but the image scores they give are not."""


def feature_errors(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """How far one output of a backend is from the reference (ONNX Runtime) on the same inputs."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"feature shapes differ: {list(ref.shape)} vs {list(cand.shape)}")
    diff = np.abs(ref - cand)
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_rel": float(diff.max()) / scale}


def output_errors(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
                  ) -> Dict[str, Dict[str, float]]:
    """`feature_errors` of every reference output, each relative to its own scale (a pooled feature and a patch
    grid can differ by orders of magnitude); an output the candidate lacks is an error."""
    missing = [name for name in reference if name not in candidate]
    if missing:
        raise EngineBuildError(f"the engine gives no output {', '.join(map(repr, missing))}")
    errors: Dict[str, Dict[str, float]] = {}
    for name, ref in reference.items():
        try:
            errors[name] = feature_errors(ref, candidate[name])
        except ValueError as error:
            raise EngineBuildError(f"output {name!r}: {error}") from None
    return errors


def onnx_io(onnx_path: "Path | str") -> TensorIO:
    """The tensors (names, input size, every output's shape after the batch) of a features.onnx, read with ONNX
    Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise EngineBuildError(f"{onnx_path}: expected one input and at least one output")
    in_shape = inputs[0].shape
    if len(in_shape) != 4 or not all(isinstance(v, int) for v in in_shape[2:]):
        raise EngineBuildError(f"{onnx_path}: input shape {in_shape} is not [B, 3, H, W] with a fixed H, W")
    tensors = []
    for output in outputs:
        tail = output.shape[1:]
        if len(output.shape) < 2 or not all(isinstance(v, int) for v in tail):
            raise EngineBuildError(f"{onnx_path}: output {output.name!r} has shape {output.shape}, expected "
                                   "[B, ...] fixed beyond the batch")
        tensors.append(OutputTensor(output.name, tuple(int(v) for v in tail)))
    return TensorIO(input_name=inputs[0].name, width=int(in_shape[3]), height=int(in_shape[2]),
                    outputs=tuple(tensors))


def onnx_outputs(onnx_path: "Path | str", io: TensorIO, batch: np.ndarray) -> Dict[str, np.ndarray]:
    """The reference outputs, every one `io` names: ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = list(io.output_names)
    out = session.run(names, {io.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
    return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, out)}


def measure_against_onnxruntime(candidate: FeatureSource, onnx_path: "Path | str", io: TensorIO,
                                images: Sequence[np.ndarray], source: str,
                                score: Optional[ScoreFunction] = None) -> Dict[str, Any]:
    """Every output of `candidate` vs ONNX Runtime on the same preprocessed images, and with `score` (best with
    exact search, so the only difference between the two columns is the feature backend) the image scores.

    The record's "outputs" has the errors of each output; "features" is the worst of them (largest relative
    error, its name under "output"), the one the precision's tolerance is checked against.
    """
    if len(images) == 0:
        raise EngineBuildError("no image to check the engine on")
    batch = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    ref = onnx_outputs(onnx_path, io, batch)
    cand = {name: np.asarray(value, dtype=np.float32) for name, value in candidate.run(batch).items()}
    errors = output_errors(ref, cand)
    worst = max(errors, key=lambda name: errors[name]["max_rel"])
    record: Dict[str, Any] = {"reference": REFERENCE, "images": int(len(batch)), "image_source": source,
                              "features": {**errors[worst], "output": worst}, "outputs": errors}
    if score is not None:
        ref_scores = np.asarray(score(ref), dtype=np.float64)
        cand_scores = np.asarray(score(cand), dtype=np.float64)
        change = np.abs(cand_scores - ref_scores)
        relative = change / np.maximum(np.abs(ref_scores), 1e-12)
        record["scores"] = {"max_abs_change": float(change.max()), "max_rel_change": float(relative.max()),
                            "reference_min": float(ref_scores.min()), "reference_max": float(ref_scores.max())}
    return record


def check_features(record: Mapping[str, Any], precision: str) -> Tuple[bool, str]:
    """Whether every output is within FEATURE_TOLERANCE[precision], and the line saying so."""
    limit = FEATURE_TOLERANCE[precision]
    worst = record["features"]
    change = float(worst["max_rel"])
    count = len(record.get("outputs", ())) or 1
    if change <= limit:
        every = f" on all {count} outputs" if count > 1 else ""
        return True, f"features within {change:.2g} of ONNX Runtime{every} (limit {limit:g})"
    return False, (f"the {precision} engine's features differ from ONNX Runtime by {change:.3g} (relative, output "
                   f"{worst.get('output', '?')!r}), more than the {limit:g} accepted for {precision}")


def check_scores(record: Mapping[str, Any], precision: str, tolerance: Optional[float] = None) -> Tuple[bool, str]:
    """Whether the score change is within the tolerance stated for the precision, and the line saying so."""
    limit = SCORE_TOLERANCE[precision] if tolerance is None else float(tolerance)
    change = float(record["scores"]["max_rel_change"])
    verdict = "within" if change <= limit else "BEYOND"
    return change <= limit, (f"image scores change by at most {change:.3g} (relative) on "
                             f"{record['images']} {record['image_source']} images: {verdict} the "
                             f"{limit:g} tolerance for {precision}")


def verify_engine(candidate: FeatureSource, onnx_path: "Path | str", io: TensorIO, images: Sequence[np.ndarray],
                  source: str, precision: str, score: Optional[ScoreFunction] = None,
                  score_tolerance: Optional[float] = None,
                  log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Check an engine; return the record for its manifest entry, or raise.

    EngineBuildError: any output beyond FEATURE_TOLERANCE[precision]; EngineScoreError (with `score`): image
    scores beyond `score_tolerance` (default SCORE_TOLERANCE[precision]).
    """
    say = log if log is not None else (lambda line: None)
    record = measure_against_onnxruntime(candidate, onnx_path, io, images, source, score)
    record["feature_tolerance"] = FEATURE_TOLERANCE[precision]
    ok, line = check_features(record, precision)
    if not ok:
        raise EngineBuildError(f"{line}: not registered; try --precision fp16/fp32")
    say(line)
    if score is not None:
        record["score_tolerance"] = SCORE_TOLERANCE[precision] if score_tolerance is None else score_tolerance
        ok, line = check_scores(record, precision, score_tolerance)
        say(line)
        if not ok:
            raise EngineScoreError(f"engine not registered: {line}. Try --precision fp16 (or fp32), or more "
                                   "representative --calibration-images for INT8.")
    return record
