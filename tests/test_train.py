"""Training: the loop learns, reports every step in order, and is reproducible on the CPU."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MIRROR
from mnistflow import data
from mnistflow.config import DataConfig, MnistflowError, TrainConfig, preset_config, validate
from mnistflow.engines.plain import (
    augment,
    evaluate,
    fit,
    native_bf16,
    outputs,
    resolve,
    temperature,
)
from mnistflow.lifecycle import networks as models
from mnistflow.lifecycle.export import onnx_probabilities, to_onnx
from mnistflow.reporting import Reporter


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


@pytest.mark.slow
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
    # train_seconds is the epochs' training loops, each timed and reported on its own.
    seconds = [m["epoch_seconds"] for _, m in recorder.epochs]
    assert result.train_seconds == pytest.approx(sum(seconds))
    for _, m in recorder.epochs:
        assert m["images_per_second"] == pytest.approx(2000 / m["epoch_seconds"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["balanced", "quality"])
def test_the_other_presets_run_and_learn_on_a_short_slice(small: data.MnistSplits, preset: str):
    """The recipe, not its promise (that is bench_presets.py's): three epochs of it on 2,000
    digits, augmentation and all, learn well beyond chance; for the quality preset's
    ensemble, every member does. (Two epochs are too few for some seeds: 32 steps left the
    fourth member at 59% on validation.)"""
    recorder = Recorder()
    config = preset_config(preset, epochs=3, device="cpu")
    assert config.augment  # both train on randomly moved digits
    assert config.members == (8 if preset == "quality" else 1)
    result = fit(config, small.train, small.val, recorder)
    per_member = len(recorder.losses) // config.members
    for start in range(0, len(recorder.losses), per_member):
        losses = recorder.losses[start : start + per_member]
        assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, start // per_member
    assert evaluate(result.model, small.test).accuracy > 0.8


@pytest.mark.slow
def test_members_are_the_networks_their_seeds_train_alone_answering_as_one(
    small: data.MnistSplits,
):
    """An ensemble of 2 is the networks of seeds 5 and 6, weight for weight; its epochs and
    steps are numbered on from one member to the next; it answers the mean of their
    probabilities, each at the temperature fitted on the validation digits."""
    config = preset_config("fast", epochs=1, device="cpu", seed=5)
    recorder = Recorder()
    both = fit(dataclasses.replace(config, members=2), small.train, small.val, recorder)
    alone = [fit(dataclasses.replace(config, seed=s), small.train, small.val) for s in (5, 6)]
    assert isinstance(both.model, models.Ensemble) and len(both.model.members) == 2
    for member, single in zip(both.model.members, alone, strict=True):
        for (name, a), b in zip(
            member.state_dict().items(), single.model.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    steps = len(alone[0].step_losses)
    assert recorder.total == 2 * steps and recorder.steps == list(range(2 * steps))
    assert both.step_losses == alone[0].step_losses + alone[1].step_losses
    assert [epoch for epoch, _ in recorder.epochs] == [1, 2]
    assert both.train_seconds == pytest.approx(sum(m["epoch_seconds"] for m in both.history))
    fitted = [temperature(outputs(r.model, small.val.images), small.val.labels) for r in alone]
    assert both.model.temperatures.tolist() == pytest.approx(fitted, rel=1e-6)
    assert fitted[0] != fitted[1]
    mean = torch.stack(
        [
            (outputs(r.model, small.test.images) / t).softmax(1)
            for r, t in zip(alone, fitted, strict=True)
        ]
    ).mean(0)
    assert torch.allclose(evaluate(both.model, small.test).probabilities, mean, atol=1e-6)


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    """Labels drawn from softmax(z / 0.5) give back a temperature near 0.5, and labels drawn
    from softmax(z * 1 / 2) one near 2: the fit finds the scale, not a fixed guess."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 10, generator=generator)
    for true in (0.5, 2.0):
        labels = torch.multinomial((logits / true).softmax(1), 1, generator=generator)[:, 0]
        assert temperature(logits, labels) == pytest.approx(true, rel=0.05)


def test_an_ensemble_saved_before_temperatures_loads_at_temperature_one():
    """An ensemble saved before version 2 (no temperatures), as a state dict or pickled,
    still loads and averages its members as it did; a mismatched list of temperatures is
    refused."""
    saved = models.Ensemble([models.build("fast") for _ in range(2)], [0.5, 2.0]).state_dict()
    del saved["temperatures"]
    saved._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    loaded = models.Ensemble([models.build("fast") for _ in range(2)], [0.7, 0.7])
    loaded.load_state_dict(saved)
    assert loaded.temperatures.tolist() == [1.0, 1.0]
    # ... and so does one pickled whole before then (mlflow.pytorch's logged model).
    pickled = models.Ensemble([models.build("fast") for _ in range(2)])
    del pickled._buffers["temperatures"]
    unpickled = pickle.loads(pickle.dumps(pickled))
    assert unpickled.temperatures.tolist() == [1.0, 1.0]
    assert unpickled(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="one positive temperature per member"):
        models.Ensemble([models.build("fast")], [1.0, 2.0])
    with pytest.raises(ValueError, match="one positive temperature per member"):
        models.Ensemble([models.build("fast")], [0.0])


def test_an_ensemble_exports_to_one_onnx_graph_of_its_members_mean(tmp_path: Path):
    """The served graph of an ensemble: the members' probabilities, each at its temperature,
    averaged in PyTorch, to 1e-4, for one image and for a batch of raw 0-255 pixels."""
    torch.manual_seed(0)
    members = [models.build("fast") for _ in range(3)]
    for member in members:  # untrained networks answer near-uniformly: spread them out
        for p in member.parameters():
            p.data.mul_(3)
    temperatures = [0.5, 1.0, 2.0]
    ensemble = models.Ensemble(members, temperatures).eval()
    path = to_onnx(ensemble, tmp_path / "ensemble.onnx")
    pixels = torch.randint(0, 256, (64, 1, 28, 28)).float()
    with torch.no_grad():
        expected = (
            torch.stack(
                [
                    (m.eval()(pixels) / t).softmax(1)
                    for m, t in zip(members, temperatures, strict=True)
                ]
            )
            .mean(0)
            .numpy()
        )
    assert expected.max(1).min() < 0.9 < expected.max()  # some confident, some not
    for batch in (pixels[:1], pixels):
        served = onnx_probabilities(path, batch.numpy())
        np.testing.assert_allclose(served, expected[: len(batch)], atol=1e-4)
    assert models.build("quality", members=2).members[1].__class__ is models.QualityNet


@pytest.mark.slow
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


@pytest.mark.slow
def test_bf16_mixed_precision_trains_in_bf16_and_keeps_float32_weights(small: data.MnistSplits):
    # One epoch: bf16 has no native support on every CPU, and emulated it costs 7 s an epoch.
    base = preset_config("fast", epochs=1, device="cpu", seed=3)
    fp32 = fit(dataclasses.replace(base, precision="fp32"), small.train, small.val)
    bf16 = fit(dataclasses.replace(base, precision="bf16"), small.train, small.val)
    # The same seed and batches: only the arithmetic differs, and it does.
    assert fp32.step_losses[0] != bf16.step_losses[0]
    assert fp32.step_losses[0] == pytest.approx(bf16.step_losses[0], rel=0.05)
    for result in (fp32, bf16):
        assert all(p.dtype == torch.float32 for p in result.model.parameters())
        assert evaluate(result.model, small.test).accuracy > 0.8  # chance is 0.1


def test_auto_precision_resolves_to_what_the_hardware_runs_natively():
    cpu = resolve(preset_config("fast", device="cpu"))
    assert cpu.device == "cpu"
    assert cpu.precision == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    # An explicit choice is kept; the classic recipe trains in float32 as the example does.
    assert resolve(preset_config("fast", device="cpu", precision="fp32")).precision == "fp32"
    assert resolve(preset_config("classic", device="cpu")).precision == "fp32"
    assert resolve(cpu) == cpu


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_every_network_maps_raw_pixels_to_ten_logits(arch: str):
    net = models.build(arch).eval()
    pixels = torch.randint(0, 256, (3, 1, 28, 28)).float()
    assert net(pixels).shape == (3, 10)


def ink_centres(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 28, 28) -> (B, 2): each image's centre of ink mass (row, column) in pixels."""
    grid = torch.arange(28, dtype=torch.float32)
    mass = images[:, 0].sum((1, 2))
    rows = (images[:, 0].sum(2) * grid).sum(1) / mass
    cols = (images[:, 0].sum(1) * grid).sum(1) / mass
    return torch.stack([rows, cols], 1)


def test_augment_draws_within_the_configured_ranges():
    images = torch.zeros(64, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255
    generator = torch.Generator().manual_seed(0)
    still = TrainConfig(augment_degrees=0, augment_scale=0, augment_shift=0)
    assert torch.allclose(augment(images, generator, still), images, atol=1e-3)

    for shift in (1.0, 4.0):
        only_shift = dataclasses.replace(still, augment_shift=shift)
        moved = augment(images, torch.Generator().manual_seed(0), only_shift)
        offsets = (ink_centres(moved) - ink_centres(images)).abs()
        assert offsets.max() <= shift + 0.05  # never beyond the range...
        assert offsets.max() > 0.8 * shift  # ...and it is used

    default = augment(images, torch.Generator().manual_seed(0), TrainConfig())
    assert default.shape == images.shape and not torch.allclose(default, images)
    # Small transforms keep the ink mostly on the canvas.
    assert default.sum().item() == pytest.approx(images.sum().item(), rel=0.3)


def test_elastic_warp_and_stroke_width_stay_within_their_ranges():
    images = torch.zeros(64, 1, 28, 28)
    images[:, :, 8:20, 12:16] = 255  # a bar 4 pixels wide
    still = TrainConfig(augment_degrees=0, augment_scale=0, augment_shift=0)
    # Off (the default), only the affine recipe's numbers are drawn: its seeds' results stand.
    drawn, affine_only = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment(images, drawn, TrainConfig())
    torch.rand(64, 4, generator=affine_only)
    assert torch.equal(drawn.get_state(), affine_only.get_state())

    warped = augment(images, torch.Generator().manual_seed(0), replace(still, augment_elastic=2))
    moved = (ink_centres(warped) - ink_centres(images)).abs()
    assert moved.max() <= 2.05 and moved.max() > 0.2  # local moves, within 2 pixels
    assert not torch.allclose(warped, images, atol=1.0)

    stroked = augment(images, torch.Generator().manual_seed(0), replace(still, augment_stroke=1))
    ink = stroked.sum((1, 2, 3)) / images.sum((1, 2, 3))
    # Up to one pixel more or less on each side of the 4 x 12 bar: 2 x 10 to 6 x 14 pixels.
    assert ink.min() >= 20 / 48 - 1e-4 and ink.max() <= 84 / 48 + 1e-4
    assert ink.min() < 0.8 and ink.max() > 1.2  # both ways, and the range is used
    # Stroke width changes the ink, not where the digit is.
    assert (ink_centres(stroked) - ink_centres(images)).abs().max() < 0.01


def replace(config: TrainConfig, **changes: float) -> TrainConfig:
    return dataclasses.replace(config, **changes)


@pytest.mark.slow
def test_warmup_places_the_learning_rate_peak(small: data.MnistSplits):
    for warmup in (0.1, 0.5):
        recorder = Recorder()
        config = preset_config("fast", epochs=1, device="cpu", warmup=warmup)
        fit(config, small.train, small.val, recorder)
        total = len(recorder.lrs)  # 16 steps
        peak = recorder.lrs.index(max(recorder.lrs))
        assert abs(peak - (warmup * total - 1)) <= 1, (warmup, peak)
        assert recorder.lrs[0] == pytest.approx(config.lr / config.start_lr_divisor)


def test_a_run_too_short_for_a_warm_up_still_trains(small: data.MnistSplits):
    """500 images, 1 epoch: 4 steps, one of them warm-up, made OneCycleLR divide by zero."""
    few = data.Split("train", small.train.images[:500], small.train.labels[:500], "first-500")
    recorder = Recorder()
    config = preset_config("fast", epochs=1, device="cpu")
    result = fit(config, few, small.val, recorder)
    assert recorder.steps == [0, 1, 2, 3]
    # No room to warm up: it only anneals, never above the peak.
    assert all(a >= b for a, b in zip(recorder.lrs, recorder.lrs[1:], strict=False))
    assert max(recorder.lrs) <= config.lr
    assert len(result.history) == 1


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


# One unusable value per field, and the words the refusal must use. A new field must be
# added here, so that validate() cannot miss it.
UNUSABLE = {
    "preset": ("", "preset must be a name"),
    "arch": ("resnet", "arch must be one of fast, classic, quality, got 'resnet'"),
    "epochs": (0, "epochs must be at least 1"),
    "members": (1.5, "members must be at least 1"),
    "batch_size": (2.5, "batch size must be at least 1"),
    "optimizer": ("sgd", "optimizer must be one of adam, adadelta, got 'sgd'"),
    "lr": (float("nan"), "learning rate must be positive"),
    "schedule": ("cosine", "schedule must be one of onecycle, step, got 'cosine'"),
    "warmup": (1.0, "warmup must be between 0 and 1"),
    "start_lr_divisor": (0.5, "start_lr_divisor must be at least 1"),
    "end_lr_divisor": (10.0, "end_lr_divisor must be at least start_lr_divisor"),
    "min_momentum": (1.0, "min_momentum must be in [0, 1)"),
    "max_momentum": (0.5, "max_momentum must be in [min_momentum, 1)"),
    "lr_gamma": (0.0, "lr_gamma must be in (0, 1]"),
    "weight_decay": (-1e-4, "weight_decay must be at least 0"),
    "label_smoothing": (1.0, "label_smoothing must be in [0, 1)"),
    "augment": ("yes", "augment must be true or false"),
    "augment_degrees": (200.0, "augment_degrees must be in [0, 180]"),
    "augment_scale": (1.0, "augment_scale must be in [0, 1)"),
    "augment_shift": (-1.0, "augment_shift must be in [0, 14] pixels"),
    "augment_elastic": (15.0, "augment_elastic must be in [0, 14] pixels"),
    "augment_stroke": (-0.5, "augment_stroke must be in [0, 1]"),
    "seed": (-1, "seed must be a whole number >= 0"),
    "device": ("tpu", "device must be one of auto, cpu, cuda, got 'tpu'"),
    "precision": ("fp16", "precision must be one of auto, bf16, fp32, got 'fp16'"),
    "log_every_steps": (0, "log_every_steps must be at least 1"),
}


def test_validate_checks_every_field_in_one_sentence():
    assert set(UNUSABLE) == {f.name for f in dataclasses.fields(TrainConfig)}
    for preset in ("fast", "balanced", "classic", "quality"):
        validate(preset_config(preset))
    for name, (value, words) in UNUSABLE.items():
        with pytest.raises(MnistflowError) as refused:
            validate(dataclasses.replace(TrainConfig(), **{name: value}))
        message = str(refused.value)
        assert message.startswith(words) and message.endswith("."), (name, message)
        assert "\n" not in message


def test_an_unknown_name_is_a_sentence_not_a_key_error(small: data.MnistSplits):
    with pytest.raises(MnistflowError, match="arch must be one of"):
        preset_config("fast", arch="resnet")
    # fit() on a config nobody validated still refuses by name, before training.
    unchecked = dataclasses.replace(TrainConfig(device="cpu"), optimizer="sgd")
    with pytest.raises(MnistflowError, match="Unknown optimizer 'sgd'"):
        fit(unchecked, small.train, small.val)


def test_fast_net_weights_saved_before_the_channels_last_flatten_load_to_the_same_function():
    # Version 1 flattened (C, H, W); its state dict has the same shapes as version 2's, so
    # only the reordering on load keeps an old checkpoint predicting what it predicted.
    torch.manual_seed(0)
    old = models.FastNet()
    old.features[-1] = torch.nn.Flatten()
    saved = old.state_dict()
    saved._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    new = models.FastNet()
    new.load_state_dict(saved)
    pixels = torch.rand(8, 1, 28, 28) * 255
    with torch.no_grad():
        assert torch.allclose(new(pixels), old(pixels), atol=1e-5)
        # A version-2 state dict is taken as it is: a round trip changes nothing.
        again = models.FastNet()
        again.load_state_dict(new.state_dict())
        assert torch.equal(again(pixels), new(pixels))
        # Read as version 2 (no reordering), the same weights compute something else.
        saved._metadata[""]["version"] = 2  # type: ignore[attr-defined]
        unordered = models.FastNet()
        unordered.load_state_dict(saved)
        assert not torch.allclose(unordered(pixels), old(pixels), atol=1e-3)
    # Weights of an older shape are not touched: PyTorch names the mismatch.
    saved._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    saved["head.0.weight"] = torch.zeros(96, 32 * 24)
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.0\.weight"):
        models.FastNet().load_state_dict(saved)
