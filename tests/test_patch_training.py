"""The trained encoders' training loop: a step yielded encoder by encoder gives the gradient of the summed
objective; the time budget stops a run cleanly (no step started that would overrun it by the last step's
time, a step whose budget runs out between two encoders dropped whole); the schedule's record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from patchcore_edge.export.methods.multiscale import MultiscaleModel  # noqa: E402
from patchcore_edge.export.methods.patch_svdd import PatchSVDDModel  # noqa: E402
from patchcore_edge.export.methods.training import Schedule, _step_generators, train  # noqa: E402


class _TimedParts(torch.nn.Module):
    """Two parts per step, each taking `pause` seconds of wall time: a model whose step time the test sets."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.pause = pause

    def step_parts(self, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                   patches_per_image: int) -> Iterator[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        for k in range(2):
            time.sleep(self.pause)
            loss = (self.weight[k] - 1.0) ** 2
            yield {f"part{k}": loss}, loss


def _images(side: int = 32, count: int = 3) -> np.ndarray:
    return np.random.default_rng(4).standard_normal((count, 3, side, side)).astype(np.float32)


@pytest.mark.parametrize("model_class, side", [(PatchSVDDModel, 128), (MultiscaleModel, 160)])
def test_backpropagating_the_parts_one_by_one_gives_the_gradient_of_their_sum(model_class: type,
                                                                               side: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = model_class(16, 1e-3)
    images = torch.from_numpy(_images(side, 2))
    rng, generator = _step_generators(0, 3)
    losses = model.step_losses(images, rng, generator, 2)
    losses["total"].backward()
    summed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rng, generator = _step_generators(0, 3)
    total = 0.0
    for named, part in model.step_parts(images, rng, generator, 2):
        part.backward()
        total += float(part.detach())
        assert set(named) <= set(losses)
        assert all(float(v.detach()) == float(losses[k].detach()) for k, v in named.items())
    assert total == pytest.approx(float(losses["total"].detach()), rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, summed[name]), name


def test_a_step_whose_budget_runs_out_between_encoders_is_dropped_whole(tmp_path: Path) -> None:
    model = _TimedParts(pause=0.3)
    checkpoint = tmp_path / "run.pt"
    record = train(model, _images(), Schedule(steps=10, images_per_step=1, patches_per_image=1, max_seconds=0.2),
                   checkpoint=checkpoint)
    assert record.stopped_by == "time" and record.abandoned_step and record.steps_done == 0
    assert torch.equal(model.weight.detach(), torch.zeros(2))  # the first part's gradient was not applied
    assert torch.load(checkpoint, weights_only=True)["step"] == 0


def test_no_step_is_started_that_the_last_one_says_would_overrun_the_budget() -> None:
    # Steps of 0.5 s, budget 0.9 s: after one step (0.5 s) the next would end at 1.0 s, so the run stops.
    model = _TimedParts(pause=0.25)
    record = train(model, _images(), Schedule(steps=10, images_per_step=1, patches_per_image=1, max_seconds=0.9))
    assert record.stopped_by == "time" and not record.abandoned_step and record.steps_done == 1
    assert record.seconds < 0.9 and record.step_seconds is not None and record.step_seconds >= 0.5
    assert not torch.equal(model.weight.detach(), torch.zeros(2))  # the whole step was applied


def test_the_record_keeps_the_schedule_cpu_time_epochs_and_load(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pt"
    schedule = Schedule(steps=2, images_per_step=2, patches_per_image=3, learning_rate=1e-3, seed=5)
    first = train(_TimedParts(pause=0.0), _images(count=4), schedule, checkpoint=checkpoint)
    assert first.steps_done == 2 and first.epochs == pytest.approx(2 * 2 / 4) and first.patches_per_step == 6
    assert first.schedule["learning_rate"] == 1e-3 and first.schedule["seed"] == 5
    assert first.cpu_seconds > 0 and first.step_cpu_seconds is not None and len(first.load_average) == 2
    more = Schedule(steps=4, images_per_step=2, patches_per_image=3, learning_rate=1e-3, seed=5)
    resumed = train(_TimedParts(pause=0.0), _images(count=4), more, checkpoint=checkpoint)
    # Times are summed over the resumed runs, like the steps.
    assert resumed.resumed_from_step == 2 and resumed.steps_done == 4 and resumed.epochs == pytest.approx(2.0)
    assert resumed.cpu_seconds >= first.cpu_seconds and resumed.seconds >= first.seconds
