"""ONNX export of an embedding-grid network (several named outputs) and its check against torch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Sequence, Union

import numpy as np
import onnx
import torch

from ..onnx_export import (ATOL, BATCH_AXIS, CPU_PROVIDER, CPU_RTOL, DEFAULT_OPSET, INPUT_NAME, OnnxParityError,
                           pin_output_shape)


def export_grids(network: torch.nn.Module, path: Union[str, "os.PathLike[str]"], outputs: Sequence[str],
                 height: int, width: int, opset: int = DEFAULT_OPSET) -> Path:
    """Write the network as single-file ONNX (dynamic batch, one output per scale); atomic rename."""
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    network = network.eval()
    example = torch.zeros(2, 3, height, width)  # batch 2: nothing may specialise on a batch of one
    with torch.no_grad():
        shapes = [tuple(int(v) for v in grid.shape[1:]) for grid in network(example)]
    names = list(outputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            axes = {name: {0: BATCH_AXIS} for name in [INPUT_NAME] + names}
            torch.onnx.export(network, (example,), str(partial), input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(partial))
        for position, shape in enumerate(shapes):
            pin_output_shape(model, shape, position)
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(partial), save_as_external_data=False)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


GridRunner = Callable[[np.ndarray], Dict[str, np.ndarray]]


def grid_session(path: Union[str, "os.PathLike[str]"], threads: int = 1) -> GridRunner:
    """An ONNX Runtime CPU session of the file as a function: batch -> {output name: grid}."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU_PROVIDER])
    names = [o.name for o in session.get_outputs()]

    def run(batch: np.ndarray) -> Dict[str, np.ndarray]:
        values = session.run(names, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(names, values))
    return run


def run_grids(path: Union[str, "os.PathLike[str]"], batch: np.ndarray, threads: int = 1) -> Dict[str, np.ndarray]:
    return grid_session(path, threads)(batch)


def check_grids_parity(network: torch.nn.Module, path: Union[str, "os.PathLike[str]"], outputs: Sequence[str],
                       batch: np.ndarray) -> float:
    """Largest |onnx - torch| relative to max |torch| over all outputs; raises OnnxParityError above CPU_RTOL."""
    with torch.no_grad():
        reference = [g.numpy() for g in network.eval()(torch.from_numpy(np.asarray(batch, dtype=np.float32)))]
    got = run_grids(path, batch)
    worst = 0.0
    for name, expected in zip(outputs, reference):
        if got[name].shape != expected.shape:
            raise OnnxParityError(f"{path}: output {name} has shape {got[name].shape}, torch {expected.shape}")
        scale = float(np.abs(expected).max())
        error = float(np.abs(got[name].astype(np.float64) - expected).max())
        if not np.isfinite(error) or error > CPU_RTOL * scale + ATOL:
            raise OnnxParityError(f"{path}: output {name} differs from torch by {error:.3g} (max {scale:.3g})")
        worst = max(worst, error / max(scale, 1e-12))
    return worst
