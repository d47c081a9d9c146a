"""Seeded, resumable training loop shared by the trained patch encoders.

Reproducibility: the weights start from `torch.manual_seed(seed)` (set by the caller before building the
model) and step t draws its images and patches from generators seeded by (seed, t) alone, so a run stopped
after any checkpoint and resumed gives the same weights as one that never stopped.

A checkpoint is a workstation file (torch.save of tensors and plain numbers, read back with
weights_only=True); it is never part of a bundle, which holds the encoder as ONNX only.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import click
import numpy as np
import torch

StepLosses = Dict[str, torch.Tensor]
OnStep = Callable[[int, int, Dict[str, float]], None]


class Trainable(Protocol):
    """A model whose `step_parts` samples its own patches from a batch of images and yields the step's
    objective in parts (one per encoder: named losses and the part's weighted total) whose sum is optimised;
    the parts share no parameters, so backpropagating each on its own gives the gradient of the sum."""

    def step_parts(self, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                   patches_per_image: int) -> Iterator[Tuple[StepLosses, torch.Tensor]]: ...

    def parameters(self) -> Any: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


class CheckpointError(Exception):
    """A checkpoint that cannot resume this training run, with the reason."""


@dataclass(frozen=True)
class Schedule:
    steps: int = 1000
    images_per_step: int = 8
    patches_per_image: int = 16
    learning_rate: float = 1e-4
    seed: int = 0
    max_seconds: Optional[float] = None  # stop early (recorded) when the wall-clock budget is spent
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images_per_step < 1 or self.patches_per_image < 1:
            raise ValueError("steps, images_per_step and patches_per_image must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint must agree on to be resumed (steps and time budget may change)."""
        return {"images_per_step": self.images_per_step, "patches_per_image": self.patches_per_image,
                "learning_rate": self.learning_rate, "seed": self.seed}


@dataclass
class TrainRecord:
    """What ran: recorded in the manifest as the method's training schedule."""

    schedule: Dict[str, Any]
    steps_done: int
    stopped_by: str  # "steps" or "time"
    seconds: float  # wall clock, summed over resumed runs
    images: int
    image_size: list
    device: str
    final_losses: Dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0
    cpu_seconds: float = 0.0  # process CPU time (all threads), summed over resumed runs
    epochs: float = 0.0  # steps_done * images_per_step / images
    patches_per_step: int = 0  # patches (pairs, triplets) per loss and encoder in one step
    step_seconds: Optional[float] = None  # median wall seconds of this run's steps
    step_cpu_seconds: Optional[float] = None  # median CPU seconds of this run's steps
    abandoned_step: bool = False  # the budget ran out inside a step, which was dropped (not applied)
    load_average: List[float] = field(default_factory=list)  # 1-minute load at this run's start and end

    def to_manifest(self) -> Dict[str, Any]:
        return asdict(self)


def _step_generators(seed: int, step: int) -> tuple:
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(step))
    return np.random.default_rng([int(seed), int(step)]), generator


def _save_checkpoint(path: Path, model: Trainable, optimiser: torch.optim.Optimizer, step: int, seconds: float,
                     cpu_seconds: float, schedule: Schedule) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                "seconds": seconds, "cpu_seconds": cpu_seconds, "identity": schedule.identity()}, partial)
    os.replace(partial, path)


def _load_checkpoint(path: Path, model: Trainable, optimiser: torch.optim.Optimizer, schedule: Schedule,
                     device: torch.device) -> tuple:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if state["identity"] != schedule.identity():
            raise CheckpointError(f"{path}: written by another schedule {state['identity']}, this run is "
                                  f"{schedule.identity()}")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        return int(state["step"]), float(state["seconds"]), float(state.get("cpu_seconds", 0.0))
    except CheckpointError:
        raise
    except Exception as error:  # torch raises many types for a foreign or truncated file
        raise CheckpointError(f"{path}: not a checkpoint of this model ({str(error).strip()[:200]})") from None


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has a load average
        return -1.0


class _Budget:
    """The wall-clock budget of one run (None: none), counting the time spent before a resume."""

    def __init__(self, max_seconds: Optional[float], spent: float) -> None:
        self.max_seconds = max_seconds
        self.started = time.perf_counter() - spent

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over(self, ahead: float = 0.0) -> bool:
        return self.max_seconds is not None and self.elapsed() + ahead >= self.max_seconds


def _run_step(model: Trainable, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
              patches_per_image: int, budget: _Budget) -> Optional[Dict[str, float]]:
    """Accumulate one step's gradient part by part; None when the budget ran out between two parts (the
    gradient so far is then dropped by the caller: no partial step is ever applied)."""
    losses: Dict[str, float] = {}
    total = 0.0
    for index, (named, part) in enumerate(model.step_parts(images, rng, generator, patches_per_image)):
        if index > 0 and budget.over():
            return None
        part.backward()
        losses.update({name: float(value.detach()) for name, value in named.items()})
        total += float(part.detach())
    losses["total"] = total
    return losses


def train(model: Trainable, images: np.ndarray, schedule: Schedule, device: str = "cpu",
          checkpoint: Optional[Path] = None, on_step: Optional[OnStep] = None) -> TrainRecord:
    """Train on normalised images float32 [N, 3, H, W]; resumes from `checkpoint` when it exists and saves
    to it every `checkpoint_every` steps and at the end.

    The time budget (schedule.max_seconds) stops a run cleanly: a step is not started when the last step's
    wall time would take the run past the budget, and a step whose budget runs out between two encoders'
    parts is dropped (its gradient discarded, the weights stay those of the last whole step), so a budget
    overruns by at most one encoder's forward + backward and the checkpoint always holds whole steps."""
    data = np.asarray(images, dtype=np.float32)
    if data.ndim != 4 or data.shape[1] != 3 or data.shape[0] < 1:
        raise ValueError(f"training images must be [N, 3, H, W], got {data.shape}")
    torch_device = torch.device(device)
    tensor = torch.from_numpy(np.ascontiguousarray(data)).to(torch_device)
    optimiser = torch.optim.Adam(model.parameters(), lr=schedule.learning_rate)
    step, spent, cpu_spent = 0, 0.0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        step, spent, cpu_spent = _load_checkpoint(Path(checkpoint), model, optimiser, schedule, torch_device)
    resumed = step
    budget = _Budget(schedule.max_seconds, spent)
    cpu_started = time.process_time() - cpu_spent
    load_start = _load()
    stopped_by, abandoned = "steps", False
    losses: Dict[str, float] = {}
    walls: List[float] = []
    cpus: List[float] = []
    model.train()
    while step < schedule.steps:
        if budget.over(ahead=walls[-1] if walls else 0.0):
            stopped_by = "time"
            break
        wall, cpu = time.perf_counter(), time.process_time()
        rng, generator = _step_generators(schedule.seed, step)
        chosen = rng.choice(data.shape[0], size=schedule.images_per_step,
                            replace=data.shape[0] < schedule.images_per_step)
        optimiser.zero_grad(set_to_none=True)
        done = _run_step(model, tensor[torch.as_tensor(np.sort(chosen), device=torch_device)], rng, generator,
                         schedule.patches_per_image, budget)
        if done is None:
            optimiser.zero_grad(set_to_none=True)
            stopped_by, abandoned = "time", True
            break
        optimiser.step()
        step += 1
        losses = done
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if on_step is not None:
            on_step(step, schedule.steps, losses)
        if checkpoint is not None and step % schedule.checkpoint_every == 0:
            _save_checkpoint(Path(checkpoint), model, optimiser, step, budget.elapsed(),
                             time.process_time() - cpu_started, schedule)
    seconds = budget.elapsed()
    cpu_seconds = time.process_time() - cpu_started
    if checkpoint is not None:
        _save_checkpoint(Path(checkpoint), model, optimiser, step, seconds, cpu_seconds, schedule)
    model.train(False)
    return TrainRecord(schedule=asdict(schedule), steps_done=step, stopped_by=stopped_by, seconds=round(seconds, 3),
                       images=int(data.shape[0]), image_size=[int(data.shape[2]), int(data.shape[3])],
                       device=str(torch_device), final_losses=losses, resumed_from_step=resumed,
                       cpu_seconds=round(cpu_seconds, 3),
                       epochs=round(step * schedule.images_per_step / data.shape[0], 3),
                       patches_per_step=schedule.images_per_step * schedule.patches_per_image,
                       step_seconds=round(float(np.median(walls)), 4) if walls else None,
                       step_cpu_seconds=round(float(np.median(cpus)), 4) if cpus else None,
                       abandoned_step=abandoned, load_average=[load_start, _load()])


class LossBar:
    """`on_step` that draws a progress bar on stderr with the latest losses."""

    def __init__(self, label: str = "training", quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.bar: Any = None
        self.done = 0
        self.losses: Dict[str, float] = {}

    def _show(self, _item: Any) -> str:
        return " ".join(f"{name} {value:.4f}" for name, value in self.losses.items())

    def __call__(self, step: int, total: int, losses: Dict[str, float]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True,
                                         show_eta=True, item_show_func=self._show)
            self.bar.__enter__()
            self.done = step - 1
        self.losses = losses
        self.bar.update(step - self.done, current_item=step)
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@dataclass(frozen=True)
class TrainedOptions:
    """Options of the trained patch-encoder methods (export --method patch_svdd|multiscale)."""

    schedule: Schedule = field(default_factory=Schedule)
    lam: Optional[float] = None  # None: the paper's default for the category kind
    texture: bool = False  # texture categories use a larger lambda
    dim: int = 64
    coreset_ratio: Optional[float] = None  # None: every training patch embedding is in the bank
    max_bank: Optional[int] = None  # cap per scale by a seeded uniform sample (see patch_bank.fit_banks)
    device: str = "cpu"
    checkpoint: Optional[Path] = None  # workstation file to resume from / save to; never in the bundle
