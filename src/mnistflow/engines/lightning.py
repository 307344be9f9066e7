"""Fit a network with PyTorch Lightning, on one process or several (DDP). Knows nothing of MLflow.

The same networks (networks.py), recipe (train.optimizer_and_schedule, train.augment) and
in-memory uint8 tensors (data.py) as the plain loop; Lightning adds the loop, DDP and
checkpoints. `pytorch_lightning` is the package name MLflow's autolog patches.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnistflow.config import MnistflowError, TrainConfig
from mnistflow.data import Split
from mnistflow.engines.plain import augment, optimizer_and_schedule, resolve
from mnistflow.lifecycle import networks
from mnistflow.reporting import Reporter

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 1, 28, 28) uint8, labels (B,) int64


def process_rank(devices: int) -> int:
    """This process's global rank, known before Lightning starts: 0 unless a launcher made it.

    torchrun sets RANK; Lightning's own launcher starts the other local processes with
    LOCAL_RANK set, and NODE_RANK names the machine.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return node * devices + int(os.environ.get("LOCAL_RANK") or 0)


class ShardedOrder:
    """DistributedSampler's order without a Dataset: this rank's share of a (shuffled)
    permutation, padded by wrapping so every rank gets the same number of images."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Training pads (every rank must take the same number of steps); evaluation does not,
        # so each image is counted exactly once when the metrics are reduced.
        self.pad = shuffle

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch (as for DistributedSampler)."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        if self.pad and self.n % self.world_size:
            order = torch.cat([order, order[: self.world_size - self.n % self.world_size]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))


class TensorBatches:
    """Batches sliced out of in-memory tensors: one index per batch, no per-sample Python.

    Lightning treats it as a dataloader: it calls sampler.set_epoch() each epoch and len().
    """

    batch_sampler = None  # looked up by Lightning next to sampler, as on a DataLoader

    def __init__(self, split: Split, batch_size: int, sampler: ShardedOrder) -> None:
        self.split, self.batch_size, self.sampler = split, batch_size, sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self.sampler.indices()
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.split.images[idx], self.split.labels[idx]


class MnistData(pl.LightningDataModule):
    """The three splits from data.load, served as TensorBatches sharded over the processes."""

    def __init__(self, train: Split, val: Split, test: Split, batch_size: int, seed: int) -> None:
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test}
        self.batch_size, self.seed = batch_size, seed

    def _batches(self, name: str, shuffle: bool) -> TensorBatches:
        world, rank = self.trainer.world_size, self.trainer.global_rank  # type: ignore[union-attr]
        split = self.splits[name]
        # --batch-size is the images per optimiser step over all processes, as in the plain
        # loop; each process takes its share.
        per_process = max(1, self.batch_size // world)
        order = ShardedOrder(len(split), shuffle, self.seed, rank, world)
        return TensorBatches(split, per_process if shuffle else 2000, order)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", shuffle=False)


class MnistModule(pl.LightningModule):
    """The network it is given, trained with the preset's loss, optimiser and schedule.

    Metric names match the plain loop's: train_loss and lr per step; epoch_train_loss,
    epoch_train_accuracy, val_loss, val_accuracy, epoch_seconds, images_per_second per epoch;
    test_loss and test_accuracy. Metric objects sync over the processes when computed.
    """

    def __init__(self, network: nn.Module, config: TrainConfig, train_size: int) -> None:
        super().__init__()
        # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
        self.network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.config = config
        self.train_size = train_size
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(10, average="micro")
        self.val_acc = MulticlassAccuracy(10, average="micro")
        self.test_acc = MulticlassAccuracy(10, average="micro")
        self.epoch_started = 0.0
        self.epoch_seconds = 0.0
        self.train_seconds = 0.0  # training loops only, as train.FitResult.train_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.float().contiguous(memory_format=torch.channels_last))  # type: ignore[no-any-return]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        x = images.float()  # (B, 1, 28, 28) 0-255
        if self.config.augment:
            x = augment(x, self.generator, self.config)
        logits = self(x).float()  # the loss in float32, whatever the forward pass ran in
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)  # type: ignore[union-attr]
        self.train_loss.update(loss.detach(), len(labels))
        self.train_acc.update(logits.detach(), labels)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_acc)

    def _evaluate(self, batch: Batch, loss: MeanMetric, accuracy: MulticlassAccuracy) -> None:
        images, labels = batch
        # Evaluation in float32 as in the plain engine: the metrics are those of the weights
        # as logged and served, not of their bf16 arithmetic.
        with torch.autocast(self.device.type, enabled=False):
            logits = self(images)
        loss.update(F.cross_entropy(logits, labels, reduction="mean"), len(labels))
        accuracy.update(logits, labels)

    def on_train_epoch_start(self) -> None:
        self.epoch_started = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            # Validation follows the epoch's last step: the training part ends here.
            self.epoch_seconds = time.perf_counter() - self.epoch_started
            self.train_seconds += self.epoch_seconds

    def on_validation_epoch_end(self) -> None:
        # compute() reduces each metric over all processes (one all-gather per metric).
        self.log_dict(
            {
                "epoch_train_loss": self.train_loss.compute().item(),
                "epoch_train_accuracy": self.train_acc.compute().item(),
                "val_loss": self.val_loss.compute().item(),
                "val_accuracy": self.val_acc.compute().item(),
                "epoch_seconds": self.epoch_seconds,
                "images_per_second": self.train_size / max(self.epoch_seconds, 1e-9),
            }
        )
        for metric in (self.train_loss, self.train_acc, self.val_loss, self.val_acc):
            metric.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(
            {
                "test_loss": self.test_loss.compute().item(),
                "test_accuracy": self.test_acc.compute().item(),
            }
        )
        self.test_loss.reset()
        self.test_acc.reset()

    def configure_optimizers(self) -> Any:
        total_steps = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler, per_step = optimizer_and_schedule(
            self.config, self.network, total_steps
        )
        interval = "step" if per_step else "epoch"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }


class LoggedCheckpoint(ModelCheckpoint):
    """Lightning's checkpointing (best by val_accuracy, and the last), handing every saved
    file to on_saved on rank 0 (which keeps it with the run)."""

    def __init__(self, folder: Path, on_saved: Callable[[Path], None] | None) -> None:
        super().__init__(
            dirpath=folder,
            filename="best",
            monitor="val_accuracy",
            mode="max",
            save_last=True,
            enable_version_counter=False,
        )
        self.on_saved = on_saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the best score when resuming, though the files now live in a new folder."""

        def moved(path: str) -> str:
            return str(Path(str(self.dirpath)) / Path(path).name) if path else path

        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = moved(state.get(key, ""))
        state["best_k_models"] = {moved(k): v for k, v in state.get("best_k_models", {}).items()}
        super().load_state_dict(state)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and self.on_saved is not None:
            self.on_saved(Path(filepath))


class Progress(pl.Callback):
    """Hands steps and epochs to a Reporter (the CLI's progress bar), as the plain loop does."""

    def __init__(self, reporter: Reporter, every: int) -> None:
        self.reporter, self.every = reporter, every
        # Losses stay tensors until a block is reported: one device sync per block.
        self.losses: list[torch.Tensor] = []
        self.first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_step = trainer.global_step
        self.reporter.start(int(trainer.estimated_stepping_batches))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(outputs["loss"].detach())
        if len(self.losses) >= self.every:
            self._report()

    def _report(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses).tolist()
        now = int(time.time() * 1000)
        self.reporter.log_steps(self.first_step, {"train_loss": losses}, [now] * len(losses))
        self.first_step += len(losses)
        self.losses = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report()
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics = {
            "train_loss": m["epoch_train_loss"],
            "train_accuracy": m["epoch_train_accuracy"],
            **{k: m[k] for k in ("val_loss", "val_accuracy", "epoch_seconds", "images_per_second")},
        }
        self.reporter.log_epoch(trainer.current_epoch + 1, metrics)


class _Interrupted(pl.Callback):
    """Remembers a Ctrl-C: Lightning turns it into sys.exit(1), and we want KeyboardInterrupt."""

    def __init__(self) -> None:
        self.seen = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.seen = self.seen or isinstance(exception, KeyboardInterrupt)


@dataclass
class LightningResult:
    model: nn.Module
    train_seconds: float
    test_metrics: dict[str, float]  # test_loss, test_accuracy, reduced over all processes


def accelerator(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise MnistflowError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


def fit(
    config: TrainConfig,
    train: Split,
    val: Split,
    test: Split,
    checkpoints: Path,
    devices: int = 1,
    num_nodes: int = 1,
    reporter: Reporter | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    resume_from: Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    before_test: Callable[[pl.Trainer], None] | None = None,
) -> LightningResult:
    """Train on train (validating on val each epoch), then test; on every process of a DDP job.

    resume_from: a Lightning checkpoint to continue from (epochs, steps, optimiser, schedule).
    before_test: called between fit and test (e.g. to stop autologging before the test).
    """
    config = resolve(config)
    torch.manual_seed(config.seed)
    network = networks.build(config.arch)
    module = MnistModule(network, config, len(train))
    datamodule = MnistData(train, val, test, config.batch_size, config.seed)
    progress = Progress(reporter, config.log_every_steps) if reporter else None
    interrupted = _Interrupted()
    distributed = devices * num_nodes > 1
    trainer = pl.Trainer(
        accelerator=accelerator(config.device),
        devices=devices,
        num_nodes=num_nodes,
        # gloo on CPU, NCCL on GPU: Lightning picks the backend for the accelerator.
        strategy="ddp" if distributed else "auto",
        max_epochs=config.epochs,
        # Lightning's names for the two arithmetics (config is resolved: bf16 or fp32).
        precision="bf16-mixed" if config.precision == "bf16" else "32-true",
        logger=False,  # MLflow's autolog records the run; no Lightning logger (no ./mlruns)
        callbacks=[
            *([progress] if progress else []),
            interrupted,
            LoggedCheckpoint(checkpoints, on_checkpoint),
            *callbacks,
        ],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # TensorBatches shards by rank itself
        log_every_n_steps=1,
        default_root_dir=checkpoints,
    )
    # Lightning ignores Ctrl-C once it has seen one; the handler comes back after.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings():
            # The epoch metrics are logged already reduced (torchmetrics' compute), so
            # Lightning's advice to sync_dist them does not apply.
            warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed")
            # resume_from is downloaded from the tracking server: tensors and plain values
            # only, never code (explicit, not whichever default the installed torch has).
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            if before_test is not None:
                before_test(trainer)
            (test_metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    except SystemExit:
        if interrupted.seen:
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        # The other local processes would wait forever on a collective this one never joins.
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher):
            launcher.kill(signal.SIGKILL)
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
    module.network.eval()
    return LightningResult(
        model=module.network,
        train_seconds=module.train_seconds,
        test_metrics={k: float(v) for k, v in test_metrics.items()},
    )
