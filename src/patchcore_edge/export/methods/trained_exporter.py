"""What Patch SVDD and the multi-scale method share on the export side: train the encoders on the nominal
images (`network`), give the fully convolutional embedding-grid network exported as features.onnx, and fit
the per-scale memory banks with their HNSW indexes and leave-one-image-out training scores (`fit`)."""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import numpy as np
import torch

from ...methods.patch_maps import MapLayout, Scale, Window, scale_grids, to_params
from ...preprocess import InputSpec
from ...search import DEFAULT_EF, DEFAULT_EF_CONSTRUCTION, DEFAULT_M, PatchSearch
from .base import FittedMethod, MethodExporter, MethodExportError, MethodParameter, MethodSettings, NetworkInfo, Progress
from .patch_bank import Log, fit_banks, index_file
from .patch_encoders import EmbeddingGrids
from .training import CheckpointError, OnStep, Schedule, Trainable, TrainedOptions, TrainRecord, train

# Training images scored with their own rows removed from every bank, for calibration's drift check.
HELD_OUT_IMAGES = 16

PARAMETERS: Tuple[MethodParameter, ...] = (
    MethodParameter("steps", int, 1000, "training steps (Adam updates)", minimum=1),
    MethodParameter("minutes", float, 0.0, "stop training after this many minutes (0: no time limit): no "
                    "step starts that the last one's time says would overrun it, and a step it cuts between two "
                    "encoders is dropped whole; the steps run are recorded", minimum=0),
    MethodParameter("images_per_step", int, 8, "images drawn per training step", minimum=1),
    MethodParameter("patches_per_image", int, 32, "patches (pairs, triplets) per loss and image in a step",
                    minimum=1),
    MethodParameter("lr", float, 1e-4, "Adam learning rate", minimum=1e-12),
    MethodParameter("lambda", float, None, "weight of the SVDD (and cosine) loss; default: the paper's "
                    "(1e-3 for objects, 1 for textures, see texture)", minimum=0),
    MethodParameter("texture", bool, False, "texture category: the larger default lambda"),
    MethodParameter("dim", int, 64, "embedding dimension", minimum=1),
    MethodParameter("coreset_ratio", float, 1.0, "keep this fraction of each bank by greedy k-center "
                    "(1: every sampled embedding)", minimum=1e-6),
    MethodParameter("max_bank", int, 50000, "cap on each scale's bank by a seeded uniform sample (0: no cap)",
                    minimum=0),
    MethodParameter("checkpoint", str, "", "workstation file to resume training from and save it to "
                    "(never put in the bundle); a stopped export resumes from it"),
    MethodParameter("checkpoint_every", int, 50, "steps between checkpoint saves", minimum=1),
)


class TrainedPatchMethod(MethodExporter):
    name: ClassVar[str]
    scales: ClassVar[Tuple[Scale, ...]]
    combine: ClassVar[str]
    window: ClassVar[Optional[Window]] = None
    object_lambda: ClassVar[float]
    texture_lambda: ClassVar[float]
    parameters = PARAMETERS

    @classmethod
    def lam(cls, options: TrainedOptions) -> float:
        if options.lam is not None:
            return float(options.lam)
        return cls.texture_lambda if options.texture else cls.object_lambda

    @abc.abstractmethod
    def build_model(self, options: TrainedOptions) -> torch.nn.Module:
        """The encoders with their heads, whose `step_parts` the training loop optimises."""

    def needs_training_images(self) -> bool:
        return True

    # ------------------------------------------------------------------ options from `--method-param`
    def options(self, settings: MethodSettings) -> TrainedOptions:
        p = settings.method_params
        minutes = float(p.get("minutes", 0.0))
        schedule = Schedule(steps=int(p["steps"]), images_per_step=int(p["images_per_step"]),
                            patches_per_image=int(p["patches_per_image"]), learning_rate=float(p["lr"]),
                            seed=int(settings.seed), max_seconds=minutes * 60.0 if minutes > 0 else None,
                            checkpoint_every=int(p["checkpoint_every"]))
        ratio = float(p["coreset_ratio"])
        return TrainedOptions(schedule=schedule, lam=p.get("lambda"), texture=bool(p["texture"]), dim=int(p["dim"]),
                              coreset_ratio=None if ratio >= 1.0 else ratio,
                              max_bank=int(p["max_bank"]) or None, device=settings.device,
                              checkpoint=Path(p["checkpoint"]) if p.get("checkpoint") else None)

    def layout(self, spec: InputSpec) -> MapLayout:
        """The cell layout of this method on the network input, or MethodExportError saying which sizes work."""
        if spec.fit == "letterbox" or spec.roi is not None:
            raise MethodExportError(f"method {self.name}: --fit letterbox and --roi are not supported yet (its "
                                    "maps do not take a validity mask); use --fit squash or --fit crop")
        try:
            return MapLayout(self.scales, scale_grids(self.scales, spec.height, spec.width), self.combine,
                             self.window)
        except ValueError as error:
            raise MethodExportError(f"method {self.name}: network input {spec.width} x {spec.height} does not "
                                    f"fit its patches ({error}); use sides that are multiples of 16, at least "
                                    "64 (e.g. --crop 224 or 256)") from None

    # ------------------------------------------------------------------ training
    def grids(self, model: torch.nn.Module) -> EmbeddingGrids:
        """The exported network of the trained model's encoders (`model.encoders` keyed by kernel), outputs in
        `scales` order."""
        encoders: Any = model.encoders
        return EmbeddingGrids([encoders[str(s.kernel)] for s in self.scales], [s.stride for s in self.scales])

    def train_network(self, images: np.ndarray, options: TrainedOptions,
                      on_step: Optional[OnStep] = None) -> Tuple[EmbeddingGrids, TrainRecord]:
        """Train on normalised images [N, 3, H, W] (seeded); the grid network comes back on the CPU, eval."""
        torch.manual_seed(options.schedule.seed)
        model = self.build_model(options).to(options.device)
        record = train(cast(Trainable, model), images, options.schedule, device=options.device,
                       checkpoint=options.checkpoint, on_step=on_step)
        network = self.grids(model.cpu()).eval()
        return network, record

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        layout = self.layout(spec)
        options = self.options(settings)
        images = np.stack(training_images) if training_images else np.zeros((0, 3, spec.height, spec.width))
        if images.shape[0] == 0:
            raise MethodExportError(f"method {self.name}: no readable nominal images to train on")
        log = getattr(self, "_log", None)
        progress: Optional[Progress] = getattr(self, "_progress", None)
        every = max(1, options.schedule.steps // 20)

        def on_step(step: int, total: int, losses: Dict[str, float]) -> None:
            if progress is not None:
                progress("training", step, total)
            if log is not None and (step % every == 0 or step == total):
                log(f"training step {step}/{total}: " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))

        try:
            network, record = self.train_network(images, options, on_step)
        except CheckpointError as error:
            raise MethodExportError(f"--method-param checkpoint: {error}") from None
        except ValueError as error:  # the patch sampling: pairs of patches that do not fit the input
            raise MethodExportError(f"method {self.name}: training on {spec.width} x {spec.height} inputs: "
                                    f"{error}; use a larger --crop / --input-size") from None
        if log is not None:
            log(f"training: {record.steps_done} steps in {record.seconds:.1f}s (stopped by {record.stopped_by}"
                + (f", resumed from step {record.resumed_from_step}" if record.resumed_from_step else "") + ")")
        self._record = record
        self._options = options
        self._layout = layout
        dim = int(options.dim)
        return network, NetworkInfo(
            outputs=tuple(s.output for s in self.scales), dim=dim, grid=layout.cells, stride=layout.cell,
            backbone={"name": f"{self.name}_encoders", "trained": True, "weights": "trained on the nominal images",
                      "parameters": int(sum(p.numel() for p in network.parameters()))},
            layers=tuple(f"encoder{s.kernel}" for s in self.scales),
            # features.grid/stride are the map's cells; each output's own grid is in features.output_shapes.
            extra={"grid_is": "map cells"})

    def attach(self, progress: Progress, log: Log) -> None:
        self._progress = progress
        self._log = log

    # ------------------------------------------------------------------ banks
    def fit_arrays(self, outputs: Mapping[str, np.ndarray], options: TrainedOptions,
                   log: Log = lambda _m: None) -> Tuple[Dict[str, np.ndarray], Dict[str, bytes], Dict[str, Any],
                                                        Dict[str, Any], Dict[str, np.ndarray]]:
        """(arrays, files, params, summary, origins) from each scale's grids over the training images."""
        arrays, files, summary, origins = fit_banks(outputs, self.scales, options.coreset_ratio,
                                                    options.schedule.seed, log, options.max_bank)
        params = to_params(self.scales, self.combine, self.window)
        params.update({"lambda": self.lam(options), "texture": bool(options.texture),
                       "coreset_ratio": options.coreset_ratio, "max_bank": options.max_bank, "dim": options.dim,
                       "index": {"library": "hnswlib", "space": "l2", "M": DEFAULT_M,
                                 "ef_construction": DEFAULT_EF_CONSTRUCTION, "ef": DEFAULT_EF,
                                 "seed": int(options.schedule.seed)},
                       "banks": summary["banks"]})
        return arrays, files, params, summary, origins

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        options: TrainedOptions = getattr(self, "_options", None) or self.options(settings)
        start = time.perf_counter()
        progress("banks", 0, 1)
        arrays, files, params, summary, origins = self.fit_arrays(outputs, options, log)
        progress("banks", 1, 1)
        bank_seconds = time.perf_counter() - start
        start = time.perf_counter()
        held_out = held_out_scores(outputs, arrays, origins, self.scales, self.combine, self.window)
        record = getattr(self, "_record", None)
        params["training"] = None if record is None else record.to_manifest()
        params["training_scores"] = {"images": int(held_out.size), "how": "leave one image out, exact search"}
        patches = sum(b["embeddings"] for b in summary["banks"].values())
        bank_rows = sum(int(a.shape[0]) for a in arrays.values())
        seconds = {"banks": bank_seconds, "held_out": time.perf_counter() - start}
        if record is not None:
            seconds = {"training": float(record.seconds), **seconds}
        return FittedMethod(
            arrays=arrays, files=files,
            file_roles={f"index_{s.output}": index_file(s) for s in self.scales}, params=params,
            summary={"patches": patches, "coreset_size": bank_rows,
                     "bank_mb": sum(a.nbytes for a in arrays.values()) / 2**20, "coverage_radius": None,
                     "seconds": seconds,
                     "coreset_note": "; ".join(f"{k}: {v['bank']:,} of {v['embeddings']:,}"
                                               for k, v in summary["banks"].items())
                                     + (f" (coreset ratio {options.coreset_ratio})" if options.coreset_ratio
                                        else " (no coreset)")},
            training_scores=held_out,
            # The paper's inference: each pixel the mean of its covering patches, no smoothing (patch_maps.py).
            map_sigma=0.0)


def held_out_scores(outputs: Mapping[str, np.ndarray], banks: Mapping[str, np.ndarray],
                    origins: Mapping[str, np.ndarray], scales: Sequence[Scale], combine: str,
                    window: Optional[Window], count: int = HELD_OUT_IMAGES) -> np.ndarray:
    """Image scores of up to `count` training images (evenly spread) with their own rows removed from every
    bank: what a new good part scores. Exact search."""
    grids = [np.asarray(outputs[s.output], dtype=np.float32) for s in scales]
    n = grids[0].shape[0]
    if n < 2:
        return np.zeros((0,), np.float32)
    layout = MapLayout(scales, [g.shape[1:3] for g in grids], combine, window)
    chosen = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    scores: List[float] = []
    for image in chosen:
        distances = []
        for scale, grid in zip(scales, grids):
            bank = banks[f"bank_{scale.output}"]
            keep = origins[scale.output] != image
            search = PatchSearch(np.ascontiguousarray(bank[keep]), None)
            distances.append(search.exact_nearest(grid[image].reshape(-1, grid.shape[3]))[0]
                             .reshape(grid.shape[1:3]))
        scores.append(float(layout.location_values(layout.cell_map(distances)).max()))
    return np.asarray(scores, dtype=np.float32)
