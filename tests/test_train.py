"""Training: the loop learns, reports every step in order, and is reproducible on the CPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest
import torch

from conftest import MIRROR
from mnistflow import data, models
from mnistflow.config import DataConfig, MnistflowError, preset_config
from mnistflow.reporting import Reporter
from mnistflow.train import augment, evaluate, fit


@pytest.fixture(scope="module")
def small() -> data.MnistSplits:
    return data.load(DataConfig(mirror=str(MIRROR), limit_train=2000, val_size=1000))


class Recorder(Reporter):
    def __init__(self) -> None:
        self.total = 0
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.epochs: list[tuple[int, Mapping[str, float]]] = []

    def start(self, total_steps: int) -> None:
        self.total = total_steps

    def log_steps(
        self, first_step: int, series: Mapping[str, Sequence[float]], timestamps_ms: Sequence[int]
    ) -> None:
        assert len(series["train_loss"]) == len(series["lr"]) == len(timestamps_ms)
        self.steps += range(first_step, first_step + len(series["train_loss"]))
        self.losses += series["train_loss"]
        self.lrs += series["lr"]

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append((epoch, metrics))


def test_fast_preset_learns_and_reports_every_step_in_order(small: data.MnistSplits):
    recorder = Recorder()
    config = preset_config("fast", epochs=2, device="cpu")
    result = fit(config, small.train, small.val, recorder)

    steps_per_epoch = -(-2000 // config.batch_size)
    assert recorder.total == 2 * steps_per_epoch
    assert recorder.steps == list(range(2 * steps_per_epoch))
    assert result.step_losses == recorder.losses
    first, last = recorder.losses[:5], recorder.losses[-5:]
    assert sum(last) / 5 < 0.5 * sum(first) / 5  # the loss falls
    # One-cycle: the learning rate rises to the peak, then anneals far below it.
    peak = recorder.lrs.index(max(recorder.lrs))
    assert 0 < peak < len(recorder.lrs) - 1
    assert max(recorder.lrs) == pytest.approx(config.lr, rel=0.05)
    assert recorder.lrs[-1] < config.lr / 100
    assert [e for e, _ in recorder.epochs] == [1, 2]
    assert recorder.epochs[-1][1]["val_accuracy"] > 0.85
    assert evaluate(result.model, small.test).accuracy > 0.85
    assert result.train_seconds > 0


def test_same_seed_gives_the_same_model_on_cpu(small: data.MnistSplits):
    config = preset_config("fast", epochs=1, device="cpu", seed=7)
    a = fit(config, small.train, small.val)
    b = fit(config, small.train, small.val)
    c = fit(dataclasses.replace(config, seed=8), small.train, small.val)
    for (name, wa), wb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(wa, wb), name
    assert a.step_losses == b.step_losses
    assert a.step_losses != c.step_losses


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_every_network_maps_raw_pixels_to_ten_logits(arch: str):
    net = models.build(arch).eval()
    pixels = torch.randint(0, 256, (3, 1, 28, 28)).float()
    assert net(pixels).shape == (3, 10)


def test_augment_keeps_shape_and_moves_pixels():
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255
    moved = augment(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert not torch.allclose(moved, images)
    # Small transforms keep the ink mostly on the canvas.
    assert moved.sum().item() == pytest.approx(images.sum().item(), rel=0.3)


def test_presets_and_impossible_values_are_refused_by_name():
    with pytest.raises(MnistflowError, match="Unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(MnistflowError, match="epochs must be at least 1"):
        preset_config("fast", epochs=-1)
    with pytest.raises(MnistflowError, match="batch size must be at least 1"):
        preset_config("fast", batch_size=0)
    with pytest.raises(MnistflowError, match="learning rate must be positive"):
        preset_config("fast", lr=0.0)
    assert preset_config("classic").optimizer == "adadelta"
    assert preset_config("fast", epochs=None).epochs == preset_config("fast").epochs
