"""How much memory a bundle needs at run time on a board, and whether that fits the board's share.

Jetson boards share one DRAM between CPU and GPU, so everything is added into one figure and compared with a
fraction of the board's memory (the profile's `memory_budget_fraction`: the OS, the camera pipeline and the
application need the rest).

Components (bytes):
- bank: memory_bank.npy (float32 [M, D]) plus the search's squared norms (float32 [M]);
- index: hnswlib's resident size, from its data layout (hnswalg.h): per element the vector, 2*M level-0 links,
  label, pointer, level, per-element lock and label-map entry; upper-level links for the expected
  1/(M-1) upper levels per element; a visited list per search thread; the fixed label-lock table.
  `index_file_bytes` gives the on-disk part of the same layout (a test checks it against real index files);
- neighbours: bank_neighbours.npy (int32 [M, b]);
- model: ONNX Runtime keeps the weights plus pre-packed copies (measured: about 3.6x the .onnx size); a
  TensorRT engine keeps its serialised size on the device;
- activations: tensors alive at once during inference. With the `onnx` package importable, a liveness analysis
  of the graph (shape inference at the batch size, peak of the sum of live tensors, the input and every
  output included) times the ORT arena factor; without it, a multiple of the input batch. TensorRT adds the
  host copies of the input and of every output;
- runtime overhead: the interpreter with numpy, OpenCV, hnswlib and onnxruntime imported plus an ORT session's
  fixed part, and for TensorRT the CUDA context and TensorRT/cuDNN/cuBLAS libraries.

Measured once (x86-64, 2 cores, onnxruntime 1.32 CPU, MobileNetV2 and ResNet-18 feature models exported by
`patchcore_edge.export`, 224 px; VmRSS growth, median of one process per case):
  mobilenet_v2 (2.1 MiB onnx): session +16.5 MiB; inference b=1 +18.3 MiB (liveness peak 9.2), b=4 +49.2 (36.8)
  resnet18 (10.6 MiB onnx):    session +47.2 MiB; inference b=1 +14.4 MiB (liveness peak 6.1), b=4 +34.3 (24.5)
hence session = 8 MiB + 3.6 x onnx, activations <= 1.3 x liveness peak + 8 MiB, and the liveness peak is 10-16x
the input batch for these backbones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..bundle import Bundle
from ..methods import scorer_class
from ..preprocess import tile_boxes
from ..search import index_resident_bytes
from .profiles import Profile

MIB = 1 << 20
# Measured on x86-64 (python 3.11, numpy 2.4, opencv 4.x, hnswlib 0.8, onnxruntime 1.32): VmRSS after
# `import numpy, cv2, hnswlib, onnxruntime, click` = 61 MiB; rounded up for the application around it.
PYTHON_RUNTIME_BYTES = 100 * MIB
ORT_SESSION_BYTES = 8 * MIB
ORT_MODEL_FACTOR = 4.0
ORT_ARENA_FACTOR = 1.3
ORT_ARENA_EXTRA_BYTES = 8 * MIB
ACTIVATION_INPUT_FACTOR = 16.0
# NOT measured here (no GPU in this project's CI): CUDA context plus TensorRT, cuDNN and cuBLAS libraries
# mapped into the process on a Jetson. An assumption to check with `tegrastats` on the board.
TENSORRT_RUNTIME_BYTES = 800 * MIB
def onnx_peak_activation_bytes(onnx_path: Path, batch: int) -> Optional[int]:
    """Peak bytes of intermediate tensors alive at once (liveness over the topologically sorted graph).

    None where the `onnx` package is missing or a shape stays unknown after shape inference.
    """
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    try:
        model = onnx.load(str(onnx_path))
    except Exception:  # onnx raises DecodeError and others for a broken file; the caller falls back
        return None
    initializers = {init.name for init in model.graph.initializer}
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_value = int(batch)
    try:
        # data_prop follows shape arithmetic (Shape -> Concat -> Resize sizes) that plain inference leaves open.
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return None
    sizes: Dict[str, int] = {}
    itemsize = {1: 4, 10: 2, 11: 8, 6: 4, 7: 8, 9: 1, 2: 1, 3: 1}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if any(d < 0 for d in dims):
            continue
        sizes[info.name] = int(math.prod(dims)) * itemsize.get(tensor.elem_type, 4)
    nodes = list(inferred.graph.node)
    last_use: Dict[str, int] = {}
    for position, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = position
    outputs = {o.name for o in inferred.graph.output}
    live: Dict[str, int] = {}
    for graph_input in inferred.graph.input:
        if graph_input.name not in initializers and graph_input.name in sizes:
            live[graph_input.name] = sizes[graph_input.name]
    peak = sum(live.values())
    for position, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name not in sizes:
                if node.op_type in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Cast", "Slice"):
                    continue  # small shape arithmetic; its size does not matter
                return None
            live[name] = sizes[name]
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= position and name not in outputs:
                del live[name]
    return peak


def estimate_memory(bundle: Bundle, profile: Profile, *, variant: Optional[str] = None,
                    batch: Optional[int] = None, backend: Optional[str] = None,
                    measure_activations: bool = True, memory_total_mb: Optional[int] = None,
                    search_threads: int = 1, image_size: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Memory of the bundle on the profile's board, by component, with the budget and a warning if it does not fit.

    `backend`: "onnxruntime" or "tensorrt" (default: the profile's, ONNX Runtime where it builds no engine);
    `batch`: images per inference (default: the profile's max_batch); `memory_total_mb`: the machine's memory
    where the profile has no fixed size (workstation, cpu-only; `devices detect` reads it); `image_size`:
    the camera frame (width, height), which a tiled bundle needs: the runtime sends all tiles of one frame
    through the network as one batch, and keeps the frame and its stitched map besides.
    """
    defaults = profile.defaults
    chosen_backend = backend or str(defaults.get("backend") or "onnxruntime")
    if chosen_backend == "tensorrt" and not profile.engines_supported:
        chosen_backend = "onnxruntime"
    images = int(batch or defaults.get("max_batch") or 1)
    features = bundle.features
    spec = bundle.input_spec
    assumptions: List[str] = []
    frame_bytes = 0
    if spec.tile is not None:  # tiling (issue 18): one frame's tiles are the network batch
        if image_size is None:
            images = 1
            assumptions.append("tiled bundle without a frame size: counted as one tile per inference, a lower "
                               "bound (pass the camera frame's size)")
        else:
            frame_width, frame_height = int(image_size[0]), int(image_size[1])
            images = len(tile_boxes(frame_height, frame_width, spec.tile, spec.tile_overlap))
            # The RGB frame, its float32 stitched map and the tile map being stitched in.
            frame_bytes = frame_height * frame_width * (3 + 4 + 4)
            assumptions.append(f"{images} tiles of {spec.tile} px (overlap {spec.tile_overlap}) per "
                               f"{frame_width}x{frame_height} frame, run as one batch")
    elif image_size is not None:
        # Each image of the batch is held as the RGB frame, and its map is made at the frame's own size (the
        # float32 map resized from the network grid, then the float32 map the result carries): with a 5 MP
        # camera that is more than the network's activations.
        frame_width, frame_height = int(image_size[0]), int(image_size[1])
        frame_bytes = images * frame_height * frame_width * (3 + 4 + 4)
        assumptions.append(f"{images} frame(s) of {frame_width}x{frame_height} with their full-size maps")

    onnx_name = features.onnx_file
    onnx_bytes = bundle.file_bytes(onnx_name)
    if chosen_backend == "tensorrt":
        engines = [e for e in bundle.engines if e.get("device") == profile.name]
        if engines:
            model = max(bundle.file_bytes(str(e.get("file"))) for e in engines if bundle.has_file(str(e.get("file"))))
        else:
            precision = str(defaults.get("precision") or "fp16")
            model = int(onnx_bytes * {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}.get(precision, 0.5))
            assumptions.append(f"no engine for {profile.name} in the bundle: engine size taken as the ONNX "
                               f"weights at {precision}")
        runtime_overhead = PYTHON_RUNTIME_BYTES + TENSORRT_RUNTIME_BYTES
        assumptions.append("TensorRT/CUDA libraries taken as 800 MiB (assumption, check with tegrastats)")
    else:
        model = int(onnx_bytes * ORT_MODEL_FACTOR)
        runtime_overhead = PYTHON_RUNTIME_BYTES + ORT_SESSION_BYTES

    input_bytes = images * 3 * spec.height * spec.width * 4
    # Every output the network declares (SPADE: the grid and the pooled feature; multi-scale: a grid per scale).
    output_bytes = images * 4 * sum(math.prod(shape) for shape in features.output_shapes.values())
    unsized = [name for name in features.outputs if name not in features.output_shapes]
    if unsized:
        assumptions.append(f"output(s) {', '.join(unsized)} have no recorded shape (a bundle from before shapes "
                           "were recorded): their host copies are not counted; re-export to count them")
    peak: Optional[int] = None
    if measure_activations:
        peak = onnx_peak_activation_bytes(bundle.path / onnx_name, images)
    if peak is None:
        peak = int(ACTIVATION_INPUT_FACTOR * input_bytes)
        assumptions.append(f"activations taken as {ACTIVATION_INPUT_FACTOR:g}x the input batch (install `onnx` "
                           "for a liveness analysis of the model graph)")
    if chosen_backend == "tensorrt":
        # The execution context's device memory (TensorRT reuses buffers at least as well as the liveness
        # bound) plus the host-side input and output arrays.
        activations = peak + input_bytes + output_bytes
    else:
        activations = int(ORT_ARENA_FACTOR * peak) + ORT_ARENA_EXTRA_BYTES
    activations += frame_bytes

    method = scorer_class(bundle.method.name)
    components = {
        **method.resident_bytes(bundle, search_threads),
        "model": model,
        "activations": activations,
        "runtime_overhead": runtime_overhead,
    }
    total = sum(components.values())
    chosen_variant = profile.variant(variant)
    memory_gb = chosen_variant.memory_gb
    fraction = float(defaults.get("memory_budget_fraction", 0.5))
    if memory_gb is not None:
        budget: Optional[int] = int(float(memory_gb) * 1024 * MIB * fraction)
        where = f"{profile.name} {chosen_variant.name}"
    elif memory_total_mb is not None:
        budget = int(memory_total_mb * MIB * fraction)
        where = f"this machine ({memory_total_mb} MB)"
    else:
        budget = None
        where = profile.name
    warning: Optional[str] = None
    fits: Optional[bool] = None
    arrays = bundle.method.arrays
    key = max(arrays, key=lambda k: math.prod(arrays[k].shape), default=None)
    largest = "memory bank" if key is None else key.replace("_", " ")
    shape = "?" if key is None else " x ".join(str(n) for n in arrays[key].shape)
    if budget is not None:
        fits = total <= budget
        if not fits:
            advice = method.memory_advice(bundle) or (f"re-export with a smaller {largest} (now {shape}), a smaller "
                                                      "backbone or batch, or pick a larger board")
            warning = (f"needs about {total / MIB:.0f} MiB, more than the {budget / MIB:.0f} MiB budget of {where} "
                       f"({fraction:.0%} of its memory): {advice}")
    return {"device": profile.name, "variant": chosen_variant.name, "backend": chosen_backend, "batch": images,
            "components": components, "total": total, "budget": budget, "fits": fits, "warning": warning,
            "assumptions": assumptions}


def format_estimate(estimate: Mapping[str, Any]) -> str:
    lines = [f"memory estimate for {estimate['device']} ({estimate['variant']}), backend {estimate['backend']}, "
             f"batch {estimate['batch']}:"]
    for name, value in estimate["components"].items():
        lines.append(f"  {name:<17} {value / MIB:10.1f} MiB")
    lines.append(f"  {'total':<17} {estimate['total'] / MIB:10.1f} MiB")
    if estimate["budget"] is not None:
        lines.append(f"  {'budget':<17} {estimate['budget'] / MIB:10.1f} MiB -> "
                     + ("fits" if estimate["fits"] else "DOES NOT FIT"))
    else:
        lines.append("  budget            unknown (no memory size for this device: pass --memory-mb)")
    for note in estimate["assumptions"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
