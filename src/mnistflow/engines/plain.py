"""Fit a network on in-memory MNIST tensors. Knows nothing of MLflow: it reports to a Reporter.

Speed comes from keeping the whole split as one uint8 tensor on the training device and
slicing shuffled batches out of it: no per-sample Python, no DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mnistflow.config import MnistflowError, TrainConfig
from mnistflow.data import Split
from mnistflow.lifecycle import networks
from mnistflow.reporting import Reporter


@dataclass
class FitResult:
    model: nn.Module
    device: torch.device
    # Seconds spent in the training loops: forward, backward, optimiser, reporting.
    # Data loading and per-epoch validation are not included.
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    step_losses: list[float] = field(default_factory=list)  # training loss of every step


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    probabilities: torch.Tensor  # (N, 10) on the CPU
    predictions: torch.Tensor  # (N,) int64 on the CPU


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise MnistflowError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Whether this device does bf16 matrix arithmetic in hardware (so mixed precision pays).

    CPUs: Intel AMX (Xeon 4th generation on). There oneDNN's bf16 convolutions make the fast
    preset's training about 1.4x faster than float32 (measured, README); without AMX, bf16 on a CPU
    is emulated and slower, so auto stays float32. torch.cpu has no public query for it yet.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and callable(amx) and bool(amx())


def resolve(config: TrainConfig) -> TrainConfig:
    """The config with "auto" replaced by the device and precision used: a run logs what
    really ran, and the same config reproduces it on another machine."""
    device = resolve_device(config.device)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return dataclasses.replace(config, device=device.type, precision=precision)  # type: ignore[arg-type]


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return math.ceil(n_images / batch_size)


def optimizer_and_schedule(
    config: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, bool]:
    """Optimiser, scheduler, and whether the scheduler steps per batch (else per epoch)."""
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adadelta":
        optimizer = torch.optim.Adadelta(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    elif config.optimizer == "adam":
        # fused: one kernel per parameter instead of about ten small ones (the default on a
        # CPU); measured 0.45 -> 0.22 ms per step for FastNet, about 3% of a CPU step.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
    else:  # validate() refuses these before any training; a library caller may skip it
        raise MnistflowError(f"Unknown optimizer {config.optimizer!r}.")
    if config.schedule == "step":
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, config.lr_gamma), False
    if config.schedule != "onecycle":
        raise MnistflowError(f"Unknown schedule {config.schedule!r}.")
    # OneCycleLR peaks at step warmup * total_steps - 1 and divides by zero when that is
    # step 0; a run too short for a warm-up step skips it and only anneals.
    warmup = config.warmup if config.warmup * total_steps > 1 else 0.0
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total_steps,
        pct_start=warmup,
        div_factor=config.start_lr_divisor,
        final_div_factor=config.end_lr_divisor / config.start_lr_divisor,
        base_momentum=config.min_momentum,
        max_momentum=config.max_momentum,
    )
    return optimizer, one_cycle, True


def augment(images: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """Random rotations, scalings and shifts of a float batch (B, 1, 28, 28), each image
    drawn within config's augment_degrees, augment_scale and augment_shift; then, where
    configured, an elastic warp (augment_elastic) and a change of stroke width
    (augment_stroke), the differences between writers that an affine map misses."""
    b = images.shape[0]
    # Draw on the CPU generator so the same seed gives the same augmentation on any device.
    r = torch.rand(b, 4, generator=generator).to(images.device)  # (B, 4) in [0, 1)
    angle = (r[:, 0] - 0.5) * math.radians(2 * config.augment_degrees)
    scale = (1 - config.augment_scale) + 2 * config.augment_scale * r[:, 1]
    # Pixels to [-1, 1] grid units: the 28-pixel image spans 2 units, 14 pixels per unit.
    shift = (r[:, 2:] - 0.5) * (2 * config.augment_shift / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # The extra draws come after the affine ones, and only when asked for: a recipe without
    # them draws exactly what it drew before they existed (its seeds' results stand).
    if config.augment_elastic > 0:
        # A smooth random displacement field, in one sampling pass with the affine map: a
        # 4 x 4 grid of offsets up to augment_elastic pixels, interpolated over the image
        # (Simard et al. 2003 smooth per-pixel noise with a Gaussian; control points cost
        # less and give the same kind of slow, local warp).
        coarse = torch.rand(b, 2, 4, 4, generator=generator).to(images.device)
        coarse = (coarse * 2 - 1) * (config.augment_elastic / 14)
        field = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1)
    out = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    if config.augment_stroke > 0:
        # Each stroke moved part of the way towards its 3 x 3 dilation (thicker, t > 0) or
        # erosion (thinner, t < 0): a pen a fraction of a pixel wider or narrower.
        t = (torch.rand(b, generator=generator).to(images.device) * 2 - 1) * config.augment_stroke
        t = t.view(b, 1, 1, 1)
        thicker = F.max_pool2d(out, 3, stride=1, padding=1)
        thinner = -F.max_pool2d(-out, 3, stride=1, padding=1)
        out = torch.where(t >= 0, out + t * (thicker - out), out - t * (thinner - out))
    return out


class _StepBuffer:
    """Per-step loss and learning rate, handed to the reporter a block at a time.

    Losses stay on the device until the block is reported: one device sync per block, not
    one per step, which matters on a GPU where a step takes well under a millisecond.
    """

    def __init__(self, reporter: Reporter, all_losses: list[float]) -> None:
        self.reporter = reporter
        self.all_losses = all_losses
        self.next_step = 0
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.times_ms: list[int] = []

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, lr: float) -> None:
        self.losses.append(loss)
        self.lrs.append(lr)
        self.times_ms.append(int(time.time() * 1000))

    def report(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses).tolist()
        self.all_losses.extend(losses)
        self.reporter.log_steps(
            self.next_step, {"train_loss": losses, "lr": self.lrs}, self.times_ms
        )
        self.next_step += len(losses)
        self.losses, self.lrs, self.times_ms = [], [], []


def fit(
    config: TrainConfig,
    train: Split,
    val: Split,
    reporter: Reporter | None = None,
    model: nn.Module | None = None,
) -> FitResult:
    """Train a network on train, validating on val after each epoch.

    config.members > 1: that many networks, one after another from the seeds seed, seed + 1,
    ..., each for config.epochs (their epochs and steps are numbered on from the previous
    member's), returned as one networks.Ensemble.
    model: train this network (e.g. to fine-tune it, or to watch it from a reporter)
    instead of a fresh one of config.arch.
    """
    reporter = reporter or Reporter()
    config = resolve(config)
    if model is not None and config.members > 1:
        raise MnistflowError("fit() trains a given model alone: members must be 1.")
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images, labels = train.images.to(device), train.labels.to(device)
    member_steps = steps_per_epoch(len(labels), config.batch_size) * config.epochs
    reporter.start(member_steps * config.members)
    step_losses: list[float] = []
    history: list[dict[str, float]] = []
    steps = _StepBuffer(reporter, step_losses)
    members = []
    for k in range(config.members):
        member_config = dataclasses.replace(config, seed=config.seed + k)
        torch.manual_seed(member_config.seed)
        network = model if model is not None else networks.build(config.arch)
        # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
        network = network.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        _fit_one(member_config, network, images, labels, val, steps, history)
        members.append(network)
    if len(members) == 1:
        trained = members[0]
    else:
        temperatures = [temperature(outputs(m, val.images), val.labels) for m in members]
        trained = networks.Ensemble(members, temperatures)
    return FitResult(
        model=trained.eval(),
        device=device,
        train_seconds=sum(epoch["epoch_seconds"] for epoch in history),
        history=history,
        step_losses=step_losses,
    )


def _fit_one(
    config: TrainConfig,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    val: Split,
    steps: _StepBuffer,
    history: list[dict[str, float]],
) -> None:
    """config.epochs of training for one network, reported (to steps.reporter) as the epochs
    after those already in history."""
    device = images.device
    bf16 = config.precision == "bf16"  # resolved: bf16 or fp32
    generator = torch.Generator().manual_seed(config.seed)
    n = len(labels)
    total_steps = steps_per_epoch(n, config.batch_size) * config.epochs
    optimizer, scheduler, per_step_schedule = optimizer_and_schedule(config, model, total_steps)
    for _ in range(config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        # Everything alive before the loop is long-lived (in the CLI: MLflow, SQLAlchemy,
        # pandas, ~630k objects): frozen, the full collections the loop's tensors trigger skip
        # it. Measured: a full collection costs 0.31 s of CPU over the CLI's heap against
        # 0.08 s over torch's alone, and the first fit in a process triggers one to three.
        gc.freeze()
        try:
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                x = images[idx].float()  # (B, 1, 28, 28) uint8 -> float 0-255
                if config.augment:
                    x = augment(x, generator, config)
                y = labels[idx]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x.contiguous(memory_format=torch.channels_last))
                # The loss in float32, whatever the forward pass ran in.
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()

                loss = loss.detach()
                steps.add(loss, optimizer.param_groups[0]["lr"])
                if per_step_schedule:
                    scheduler.step()
                loss_sum += loss * len(idx)
                correct += (logits.argmax(1) == y).sum()
                if len(steps) >= config.log_every_steps:
                    steps.report()
        finally:
            # Also on Ctrl-C: what was trained so far is reported, not dropped.
            steps.report()
            gc.unfreeze()
        if not per_step_schedule:
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started

        val_eval = evaluate(model, val)
        metrics = {
            "train_loss": loss_sum.item() / n,
            "train_accuracy": correct.item() / n,
            "val_loss": val_eval.loss,
            "val_accuracy": val_eval.accuracy,
            "epoch_seconds": seconds,
            "images_per_second": n / seconds,
        }
        history.append(metrics)
        steps.reporter.log_epoch(len(history), metrics)


# The range a fitted temperature is searched in: far wider than any seen (0.45-1.5).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T at which softmax(logits / T) has the least cross-entropy on labels
    (temperature scaling, Guo et al. 2017): fitted on validation digits, never the test set."""
    # SciPy's bounded scalar minimiser (scikit-learn's dependency), on log T: one smooth
    # convex-in-practice variable needs no optimiser of our own.
    from scipy.optimize import minimize_scalar

    logits, labels = logits.double(), labels.cpu()

    def loss(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    return math.exp(minimize_scalar(loss, bounds=(low, high), method="bounded").x)


# Images per forward pass when evaluating on the CPU. Small enough that a batch's activations
# stay in the CPU's caches: on the 2-core build machine, 10,000 digits took 0.57 s at 256
# against 0.65 s at 2,000 for the fast network, 1.8 s against 4.2 s for the quality one.
# A GPU wants large batches instead.
CPU_EVAL_BATCH, GPU_EVAL_BATCH = 256, 2000


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int | None = None) -> Evaluation:
    """Accuracy, mean cross-entropy, probabilities and predictions of model on a split."""
    logits = outputs(model, split.images, batch_size)
    probabilities = logits.softmax(1)
    predictions = probabilities.argmax(1)
    return Evaluation(
        accuracy=(predictions == split.labels).float().mean().item(),
        loss=F.cross_entropy(logits, split.labels).item(),
        probabilities=probabilities,
        predictions=predictions,
    )


@torch.inference_mode()
def outputs(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """The network's logits (N, 10), float32 on the CPU, for uint8 images (N, 1, 28, 28);
    batch_size: images per forward pass, by default the best for the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = CPU_EVAL_BATCH if device.type == "cpu" else GPU_EVAL_BATCH
    logits = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float()
        logits.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(logits) if logits else torch.empty(0, 10)
