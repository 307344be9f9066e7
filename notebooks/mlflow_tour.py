# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of MLflow's tracking and model calls, on MNIST
#
# One MLflow call at a time, on real MNIST digits: each section shows one idea with the
# smallest code that does it, then reads back from the store what the call recorded (with
# `MlflowClient`, printed below the cell), and says where the same thing shows in the MLflow
# UI. mnistflow's own modules do all of this for production; this notebook is the
# classroom version.
#
# 1. Where runs go · 2. Params · 3. Metrics (and `synchronous=False`) · 4. Tags and
# description · 5. Artifacts · 6. Training: by hand, Lightning autolog, scikit-learn autolog ·
# 7. Models, the registry, aliases, and how `mnistflow promote` decides · 8. MLflow Projects ·
# 9. What mnistflow adds on top
#
# **Run it yourself.** `make tour` runs it top to bottom on a fresh store and saves the outputs
# into `notebooks/mlflow_tour.ipynb` (a few minutes on 2 CPU cores). The store lives in
# `notebooks/tour-store/` (git-ignored, emptied at the start), or in your own tracking server
# when `MLFLOW_TRACKING_URI` is set. Look at what it made with
# `.venv/bin/mnistflow ui --tracking-uri sqlite:///notebooks/tour-store/mlflow.db`
# (MLflow's UI on http://127.0.0.1:5000). MNIST comes from
# mnistflow's loader, so `MNISTFLOW_MNIST_MIRROR` works here as everywhere (offline: a folder
# holding the four `.gz` files). The notebook is paired with `notebooks/mlflow_tour.py`
# (jupytext's percent format), the file to edit and review; `make tour` rewrites the notebook
# from it. Jupyter with jupytext installed saves both files at once.

# %%
import warnings

# Before the imports: tqdm, imported by MLflow, warns in a kernel without ipywidgets.
warnings.filterwarnings("ignore", message="IProgress not found")
import contextlib
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures go to the store, not to this page
import matplotlib.pyplot as plt
import mlflow
import mlflow.projects
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnistflow import data
from mnistflow.config import DataConfig, TrackingConfig, preset_config
from mnistflow.lifecycle import promotion
from mnistflow.runs import plain

# What would bury the read-backs: INFO lines (creating tables, "GPU available: False"),
# download progress bars, and warnings about these libraries' own internals. MLflow's
# warnings still show.
for name in ("mlflow", "alembic", "pytorch_lightning", "lightning.pytorch"):
    logging.getLogger(name).setLevel(logging.WARNING)
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # Lightning on torch 2.13
warnings.filterwarnings("ignore", message="`y_pred` was renamed", category=FutureWarning)

# The repository is the folder above this notebook that holds MLproject (section 8).
REPO = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "MLproject").is_file())
os.chdir(REPO)  # so that running this cell again never stands in the folder it empties
# Everything the tour writes: the store, its artifacts, files to log, downloads.
DEFAULT_TOUR = REPO / "notebooks" / "tour-store"
TOUR = Path(os.environ.get("MNISTFLOW_TOUR_DIR") or DEFAULT_TOUR).resolve()
if TOUR == DEFAULT_TOUR:
    shutil.rmtree(TOUR, ignore_errors=True)  # a fresh store on every run
elif TOUR.exists() and any(TOUR.iterdir()):
    raise SystemExit(f"MNISTFLOW_TOUR_DIR={TOUR} is not empty; give the tour a new folder.")
TOUR.mkdir(parents=True, exist_ok=True)
# An embedded store puts an experiment's artifacts in ./mlruns of the folder it is created
# from: working in TOUR keeps them beside the database.
os.chdir(TOUR)
# mnistflow's training writes through a local spool (section 9); the tour keeps it here.
os.environ.setdefault("MNISTFLOW_SPOOL_DIR", str(TOUR / "spool"))


def shown(text: object) -> str:
    """text with this machine's folders as <tour> and <repo>, and any login in a URI cut
    out, so that the saved outputs read the same wherever the tour ran."""
    text = re.sub(r"//[^/@\s]+@", "//", str(text))
    return text.replace(str(TOUR), "<tour>").replace(str(REPO), "<repo>")


# The digits, from mnistflow's loader: 3,000 training images, the fixed validation split and
# the test set, as uint8 tensors (N, 1, 28, 28).
splits = data.load(DataConfig(limit_train=3000))
print({s.name: tuple(s.images.shape) for s in (splits.train, splits.val, splits.test)})

# %% [markdown]
# ## 1. Where runs go: tracking URI, experiment, run
#
# The **tracking URI** names the store. `sqlite:///path/mlflow.db` is an embedded store: a
# SQLite file and a local folder for the files, no server. `http://host:5000` is a tracking
# server. MLflow reads `MLFLOW_TRACKING_URI` when nothing sets one in code; the tour does the
# same, and uses a fresh SQLite file otherwise. An **experiment** groups runs
# (`set_experiment` makes it when missing and makes it the active one); a **run** is one
# `start_run` ... end, with a name and a description. `MlflowClient` is the explicit API: it
# takes ids and never depends on what is active, which is why every read-back below uses it.

# %%
URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{TOUR / 'mlflow.db'}"
mlflow.set_tracking_uri(URI)
experiment = mlflow.set_experiment("mlflow-tour")
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it holds model
# training (mnistflow's store.experiments.use_experiment sets it on every experiment it makes).
mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")

with mlflow.start_run(run_name="first-run", description="The tour's first, empty run.") as run:
    print("active run:", mlflow.active_run().info.run_id == run.info.run_id)
print("after the block:", mlflow.active_run())

client = MlflowClient()  # the same store: it takes the URI set above
stored = client.get_run(run.info.run_id)
print("tracking URI:  ", shown(mlflow.get_tracking_uri()))
print("experiment:    ", experiment.name, "id", experiment.experiment_id)
print("run name:      ", stored.info.run_name)
print("status:        ", stored.info.status)
print("description:   ", stored.data.tags["mlflow.note.content"])
print("artifact URI:  ", shown(stored.info.artifact_uri))

# %% [markdown]
# The `with` block ends the run as `FINISHED` (or `FAILED` when an exception leaves it).
# **In the UI:** Experiments → `mlflow-tour` lists the run by its name; its page shows the
# description at the top and the status, times and run id in the overview.

# %% [markdown]
# ## 2. Params: `log_param` and `log_params`
#
# A param is an input that decides the result (learning rate, batch size). `log_param` sends
# one; `log_params` sends a whole dict in one request, which is what to use for a config.
# Params are stored as strings, and a run's param is **written once**: logging it again with
# the same value is accepted, with another value it is refused (a run must not say two things
# about its inputs).

# %%
with mlflow.start_run(run_name="params") as run:
    mlflow.log_param("lr", 0.01)
    mlflow.log_params({"batch_size": 64, "epochs": 2, "optimizer": "adam"})
    mlflow.log_param("lr", 0.01)  # the same value again: fine
    try:
        mlflow.log_param("lr", 0.1)
    except MlflowException as e:
        print("refused:", e.error_code, "-", str(e).split(". ")[0])

params = client.get_run(run.info.run_id).data.params
print("stored params:", params)
assert params["lr"] == "0.01"  # the first value stays; every value is a string

# %% [markdown]
# **In the UI:** the run's overview lists its Parameters; select runs in the experiment and
# Compare to see their params side by side.

# %% [markdown]
# ## 3. Metrics: values over steps, and `synchronous=False`
#
# A metric is a number that can change during the run: each value is stored with a `step`
# and a timestamp, so a metric has a **history**. `log_metric` sends one value,
# `log_metrics` several at the same step. The run's `data.metrics` holds the latest value
# of each; `get_metric_history` gives every one.

# %%
with mlflow.start_run(run_name="metrics") as run:
    for epoch in range(3):
        mlflow.log_metric("train_loss", 1.0 / (epoch + 1), step=epoch)
        mlflow.log_metrics(
            {"val_loss": 1.2 / (epoch + 1), "val_accuracy": 0.8 + 0.05 * epoch}, step=epoch
        )

print("latest values:", client.get_run(run.info.run_id).data.metrics)
for point in client.get_metric_history(run.info.run_id, "val_accuracy"):
    print(f"  val_accuracy step {point.step}: {point.value:.2f} (timestamp {point.timestamp})")

# %% [markdown]
# Each call with the default `synchronous=True` waits until the store has the value. With
# `synchronous=False` the call puts the value on a queue and returns at once; a background
# thread writes the queue to the store. The values are certain to be stored after
# `mlflow.flush_async_logging()`, after `.wait()` on the operation the call returned, or
# when the run ends (`end_run`, and so the end of the `with` block, flushes first). Setting
# `MLFLOW_ENABLE_ASYNC_LOGGING=true` makes asynchronous the default for every call.
#
# What it saves depends on one more setting. In MLflow 3.17 the background thread writes one
# queued call at a time, so the store does exactly the same work as before, only later;
# with `MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS` set, it waits that long and merges what
# queued meanwhile into batches (up to 1,000 values each), one store write per batch.
# Measured here, on whatever machine ran this notebook last (the outputs below): the same
# 1,000 points logged one call at a time, three ways, into the same store.

# %%
POINTS = 1000


def log_points(synchronous: bool) -> tuple[str, float, float]:
    """Log POINTS values one call at a time; returns (run id, seconds until the loop
    returned, seconds until every value was stored)."""
    with mlflow.start_run(run_name=f"{POINTS} points, synchronous={synchronous}") as run:
        started = time.perf_counter()
        for step in range(POINTS):
            mlflow.log_metric("x", step / POINTS, step=step, synchronous=synchronous)
        returned = time.perf_counter() - started
        mlflow.flush_async_logging()  # nothing to wait for when every call was synchronous
        stored = time.perf_counter() - started
    return run.info.run_id, returned, stored


for synchronous, buffering in ((True, None), (False, None), (False, "1")):
    if buffering:
        os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = buffering
    run_id, returned, stored = log_points(synchronous)
    os.environ.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)
    history = client.get_metric_history(run_id, "x")
    assert len(history) == POINTS  # every value arrived, whichever way
    how = f"synchronous={synchronous}" + (f", buffering {buffering} s" if buffering else "")
    print(
        f"{how:35} the loop returned after {returned:5.1f} s, all {len(history)} values "
        f"stored after {stored:5.1f} s ({1000 * stored / POINTS:.1f} ms a value)"
    )

# One asynchronous call, and waiting for just that one:
with mlflow.start_run(run_name="one async value") as run:
    operation = mlflow.log_metric("x", 1.0, synchronous=False)
    operation.wait()
    print("after wait():", client.get_run(run.info.run_id).data.metrics)

# %% [markdown]
# A synchronous call pays one store write per value: a SQLite transaction, committed to
# disk, or an HTTP request to a server. Unbuffered asynchronous logging frees the loop but
# leaves the store as busy; buffered, it folds hundreds of values into one write. When the
# values are all at hand anyway, `MlflowClient().log_batch(run_id, metrics=[...])` sends
# them in one call; mnistflow's training loop sends its per-step losses that way, in blocks.
#
# **In the UI:** the run's Model metrics tab charts every metric against its step (or time);
# the overview shows the latest value of each.

# %% [markdown]
# ## 4. Tags and the description
#
# Tags are free-form labels you may change later (params may not): `set_tag` one, `set_tags`
# a dict. MLflow adds its own, named `mlflow.*`: who ran it, from which program and commit,
# the run name (`mlflow.runName`), and the description (`mlflow.note.content`, which is why
# a description can be set or edited afterwards as a tag).

# %%
with mlflow.start_run(run_name="tags", description="Trained for the tour.") as run:
    mlflow.set_tag("stage", "tour")
    mlflow.set_tags({"dataset": "mnist", "owner": "learner"})
client.set_tag(run.info.run_id, "mlflow.note.content", "Edited after the run ended.")

tags = client.get_run(run.info.run_id).data.tags
print("ours:  ", {k: v for k, v in sorted(tags.items()) if not k.startswith("mlflow.")})
print("MLflow's:")
for key, value in sorted(tags.items()):
    if key.startswith("mlflow."):
        print(f"  {key} = {shown(value)}")

# %% [markdown]
# **In the UI:** tags appear in the run's overview and can be edited there; the description
# is the editable text at the top of the run page. In the experiment's run list, tags can be
# shown as columns and searched: `tags.stage = 'tour'`.

# %% [markdown]
# ## 5. Artifacts: files that belong to a run
#
# Artifacts are files: reports, plots, configs, models. `log_artifact(local_path,
# artifact_path=None)` copies **one file** into the run, under the folder `artifact_path`
# (the top when it is `None`), keeping its file name. `log_artifacts(local_dir,
# artifact_path=None)` copies **the contents** of a folder (not the folder itself) there.
# `log_figure`, `log_dict` and `log_text` write a matplotlib figure, a dict (JSON or YAML by
# the extension) or a string straight to the given artifact file, with no local file.

# %%
files = TOUR / "files"
(files / "reports").mkdir(parents=True)
(files / "notes.txt").write_text("Written for the tour.\n")
(files / "reports" / "summary.md").write_text("# Summary\n")
(files / "reports" / "errors.csv").write_text("index,label,predicted\n")

fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for ax, image, label in zip(axes.flat, splits.test.images, splits.test.labels, strict=False):
    ax.imshow(image[0], cmap="gray_r")
    ax.set_title(int(label))
    ax.axis("off")

with mlflow.start_run(run_name="artifacts") as run:
    mlflow.log_artifact(files / "notes.txt")  # -> notes.txt
    mlflow.log_artifact(files / "notes.txt", artifact_path="docs")  # -> docs/notes.txt
    mlflow.log_artifacts(files / "reports", artifact_path="reports")  # -> reports/*.{md,csv}
    mlflow.log_figure(fig, "figures/test-digits.png")
    mlflow.log_dict({"classes": list(range(10)), "size": [28, 28]}, "config/classes.json")
    mlflow.log_text("The first 16 test digits.", "figures/README.txt")
plt.close(fig)


def artifact_tree(run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, with its size (list_artifacts lists one level)."""
    found = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found += artifact_tree(run_id, item.path)
        else:
            found.append(f"{item.path} ({item.file_size} B)")
    return found


print("artifact URI:", shown(client.get_run(run.info.run_id).info.artifact_uri))
print("\n".join(artifact_tree(run.info.run_id)))

downloaded = mlflow.artifacts.download_artifacts(
    run_id=run.info.run_id, artifact_path="reports", dst_path=str(TOUR / "downloads")
)
print("downloaded to", shown(downloaded), "->", sorted(p.name for p in Path(downloaded).iterdir()))
print("classes.json:", mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config/classes.json"))

# %% [markdown]
# **Where the files live.** With an embedded store the artifact URI is a plain folder: the
# experiment's artifact location plus `<run id>/artifacts`. MLflow's default location is
# `./mlruns` in whatever folder the experiment was created from, which is why mnistflow
# creates its experiments with a location beside the database. With a tracking server there
# are two set-ups:
#
# - **Proxied** (`mlflow server --artifacts-destination s3://bucket/path`, the default
#   `--serve-artifacts`): runs get `mlflow-artifacts:/...` URIs; the client uploads and
#   downloads through the server, which alone holds the bucket's keys. This is what
#   `deploy/docker-compose.yml` runs, with MinIO as the bucket.
# - **Direct** (`mlflow server --no-serve-artifacts --default-artifact-root s3://bucket/path`):
#   runs get `s3://...` URIs and each client reads and writes the bucket itself, with its own
#   keys and, for MinIO, `MLFLOW_S3_ENDPOINT_URL`. The server keeps only the metadata.
#
# **In the UI:** the run's Artifacts tab shows the tree, previews text, JSON and images, and
# downloads any file.

# %% [markdown]
# ## 6. Training a model three ways
#
# ### By hand
#
# A small PyTorch network on the 3,000 training images, with the calls above: params once,
# metrics per epoch with `step`, the test result at the end.

# %%
torch.manual_seed(0)
# The tour's networks take pixels scaled to 0-1 (mnistflow's scale raw 0-255 pixels themselves).
train_x, train_y = splits.train.images.float() / 255, splits.train.labels
val_x, val_y = splits.val.images[:1000].float() / 255, splits.val.labels[:1000]
test_x, test_y = splits.test.images[:2000].float() / 255, splits.test.labels[:2000]
config = {"hidden": 64, "lr": 3e-3, "epochs": 4, "batch_size": 64}


def make_network() -> nn.Module:
    # (N, 1, 28, 28) -> (N, 784) -> (N, hidden) -> (N, 10) logits
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 10)
    )


def accuracy(network: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (network(x).argmax(1) == y).float().mean().item()


network = make_network()
optimizer = torch.optim.Adam(network.parameters(), lr=config["lr"])
with mlflow.start_run(run_name="torch, logged by hand") as run:
    mlflow.log_params(config)
    for epoch in range(config["epochs"]):
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), config["batch_size"]):
            batch = order[start : start + config["batch_size"]]
            loss = nn.functional.cross_entropy(network(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mlflow.log_metrics(
            {"train_loss": loss.item(), "val_accuracy": accuracy(network, val_x, val_y)}, step=epoch
        )
    mlflow.log_metric("test_accuracy", accuracy(network, test_x, test_y))

by_hand = client.get_run(run.info.run_id)
print("params: ", by_hand.data.params)
print("metrics:", {k: round(v, 4) for k, v in by_hand.data.metrics.items()})
print(
    "val_accuracy per epoch:",
    [round(m.value, 3) for m in client.get_metric_history(run.info.run_id, "val_accuracy")],
)

# %% [markdown]
# ### PyTorch Lightning under `mlflow.pytorch.autolog()`
#
# The same network inside a `LightningModule`, and not one logging call: autolog patches
# `Trainer.fit` to log the optimiser's settings as params, every `self.log(...)` value as a
# metric (per epoch here) and a model summary. It logs into the active run, or starts one;
# Lightning's own `MLFlowLogger` is not needed (`logger=False`). By default it also logs the
# trained model, whose requirements MLflow finds by loading it in a child process, which
# takes a while; the tour turns that off here and logs a model by hand in section 7.


# %%
class Classifier(pl.LightningModule):
    def __init__(self, network: nn.Module, lr: float) -> None:
        super().__init__()
        self.network, self.lr = network, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


mlflow.pytorch.autolog(log_models=False, checkpoint=False)
torch.manual_seed(0)
with mlflow.start_run(run_name="lightning, autolog") as run:
    trainer = pl.Trainer(
        max_epochs=config["epochs"], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(
        Classifier(make_network(), config["lr"]),
        DataLoader(TensorDataset(train_x, train_y), batch_size=config["batch_size"], shuffle=True),
        DataLoader(TensorDataset(val_x, val_y), batch_size=500),
    )
mlflow.pytorch.autolog(disable=True)

autologged = client.get_run(run.info.run_id)
print("params: ", autologged.data.params)
print("metrics:", {k: round(v, 4) for k, v in autologged.data.metrics.items()})
print(
    "val_accuracy per epoch:",
    [round(m.value, 3) for m in client.get_metric_history(run.info.run_id, "val_accuracy")],
)
print("artifacts:", artifact_tree(run.info.run_id))

# %% [markdown]
# ### scikit-learn under `mlflow.sklearn.autolog()`
#
# For scikit-learn, autolog patches `fit`: every parameter of the estimator (of each step of
# a pipeline too), training metrics computed on the training data, the fitted model with
# its signature, and the training set as a dataset input. Metrics computed afterwards
# (`score`, or `sklearn.metrics` functions on the fitted model's predictions) are logged too,
# named after the data they were computed on. MLflow warns that the model is saved as a
# pickle: loading a pickle runs code, so load only models from a store you trust.

# %%
train_pixels, test_pixels = train_x.reshape(-1, 784).numpy(), test_x.reshape(-1, 784).numpy()
train_labels, test_labels = train_y.numpy(), test_y.numpy()

mlflow.sklearn.autolog()
with mlflow.start_run(run_name="scikit-learn, autolog") as run:
    baseline = make_pipeline(PCA(n_components=40, random_state=0), LogisticRegression(max_iter=300))
    baseline.fit(train_pixels, train_labels)
    baseline.score(test_pixels, test_labels)
mlflow.sklearn.autolog(disable=True)

sk = client.get_run(run.info.run_id)
chosen = ("pca__n_components", "logisticregression__C", "logisticregression__max_iter")
print(f"params:  {len(sk.data.params)} of them, e.g.", {k: sk.data.params[k] for k in chosen})
print("metrics:", {k: round(v, 4) for k, v in sorted(sk.data.metrics.items())})
print("tags:   ", {k: v for k, v in sk.data.tags.items() if k.startswith("estimator")})
print("inputs: ", [(d.dataset.name, [t.value for t in d.tags]) for d in sk.inputs.dataset_inputs])

# %% [markdown]
# **In the UI:** the three runs sit side by side in the experiment; select them and Compare
# to chart `val_accuracy` of the first two together. The autologged runs show their models
# under Logged models (and in the experiment's Models tab), each with its own page.

# %% [markdown]
# ## 7. Models: logging, registering, aliases, loading by alias
#
# `log_model` saves a model as an MLflow model: the flavour's files, an `MLmodel` file, the
# Python requirements, a **signature** (the input and output types and shapes, checked when
# the model is called through `pyfunc`) and an **input example**. In MLflow 3 a logged model
# is an entity of its own with an id (`m-...`), linked to the run that logged it, and its URI
# is `models:/<model id>`. Registering it makes a numbered **version** of a named model in the
# registry; an **alias** (`@champion`) is a movable name for one version, and
# `models:/<name>@<alias>` loads whatever version it points at now. Stages ("Production")
# are deprecated; aliases replace them.

# %%
example = test_x[:5].numpy()  # (5, 1, 28, 28) float32
with torch.no_grad():
    signature = infer_signature(example, network(test_x[:5]).numpy())
with mlflow.start_run(run_name="log_model") as run:
    mlflow.log_param("hidden", config["hidden"])
    info = mlflow.pytorch.log_model(
        network,
        name="digits",
        signature=signature,
        input_example=example[:2],
        # Named, so MLflow need not infer them by importing the model in a child process.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",  # without the local "+cpu"
            f"mlflow=={mlflow.__version__}",
        ],
    )

logged = client.get_logged_model(info.model_id)
print("model id: ", info.model_id, "| URI:", info.model_uri)
print("name:     ", logged.name, "| from run:", logged.source_run_id == run.info.run_id)
print("files at: ", shown(logged.artifact_location))
print("signature:", info.signature.to_dict())

# %%
version = mlflow.register_model(info.model_uri, "tour-digits")
client.set_registered_model_alias("tour-digits", "champion", version.version)

by_alias = client.get_model_version_by_alias("tour-digits", "champion")
print(
    "version",
    by_alias.version,
    "of",
    by_alias.name,
    "| aliases:",
    by_alias.aliases,
    "| source:",
    by_alias.source,
    "| run:",
    by_alias.run_id == run.info.run_id,
)

champion = mlflow.pyfunc.load_model("models:/tour-digits@champion")
probabilities = champion.predict(test_x[:10].numpy())  # checked against the signature first
print("predicted:", probabilities.argmax(1).tolist())
print("true:     ", test_y[:10].tolist())
try:
    champion.predict(test_x[:2].numpy().reshape(2, 784))  # the wrong shape
except MlflowException as e:
    print("refused:", str(e).split("Error: ")[-1])

# %% [markdown]
# **In the UI:** Models (the registry) lists `tour-digits` with version 1 and its `@champion`
# alias; the version's page links to the logged model and the run. The run's page lists the
# model under Logged models, where the signature and the input example are shown.

# %% [markdown]
# ### How mnistflow's `promote` decides
#
# In mnistflow an alias moves only on evidence. `mnistflow train --register` logs the served
# model and registers it as a new version with `@challenger`; `mnistflow promote` then
# evaluates `@challenger` and `@champion` on the test set with `mlflow.models.evaluate`, each
# in a nested run under one "promote" run, and moves `@champion` only if
# `mlflow.validate_evaluation_results` accepts the challenger on its rules: its accuracy is at
# least `min_accuracy`, and it is not worse than the champion, measured now on the same
# images, by more than `margin`. (The command adds a third, a floor on digits by writers
# outside MNIST, `min_writers_accuracy`; handed only the test set, as here, `promote` checks
# the first two.) Below, the real code: two training runs on small slices
# (`plain.train_run`, what `mnistflow train` calls), each followed by
# `promotion.promote` (what `mnistflow promote` calls). The floor suits these one-epoch runs
# on a few thousand images; the command's defaults, 0.99 and 0.002, suit a full one.


# %%
def train_and_register(limit_train: int, run_name: str) -> str:
    """One mnistflow training run on limit_train images, registered as tour-mnist."""
    summary = plain.train_run(
        DataConfig(limit_train=limit_train),
        preset_config("fast", epochs=1, precision="fp32"),
        TrackingConfig(
            tracking_uri=URI, experiment="tour-mnistflow", run_name=run_name, system_metrics=False
        ),
        register_as="tour-mnist",
    )
    print(
        f"{run_name}: test accuracy {summary.test_accuracy:.4f}, registered as version "
        f"{summary.registered_version} (@challenger)"
    )
    return str(summary.registered_version)


def show(decision: promotion.Decision) -> None:
    print("promoted:", decision.promoted, "|", decision.reason)
    for evidence in decision.evidence:
        print(
            f"  v{evidence.version} ({evidence.role}): accuracy "
            f"{evidence.metrics['accuracy_score']:.4f} on {len(splits.test):,} test images"
        )
    aliases = client.get_registered_model("tour-mnist").aliases
    print("  aliases now:", aliases)


RULES = {"min_accuracy": 0.7, "margin": 0.002}
# mlflow.models.evaluate cannot tell from integer labels that they are classes, and warns
# even though promote names the model type ("classifier").
logging.getLogger("mlflow.models.evaluation.evaluators.classifier").setLevel(logging.ERROR)

train_and_register(6000, "6,000 images")
first = promotion.promote(URI, "tour-mnist", **RULES, test=splits.test)
show(first)
assert first.promoted  # there was no champion: the floor was the only rule

# %% [markdown]
# A second version, trained on half as many images: does it replace the champion?

# %%
train_and_register(3000, "3,000 images")
second = promotion.promote(URI, "tour-mnist", **RULES, test=splits.test)
show(second)
assert not second.promoted

record = client.get_run(second.evaluation_run_id)
print("promote run:", record.info.run_name, "| params:", record.data.params)
print("  tags:", {k: record.data.tags[k] for k in ("promoted", "reason")})
for nested in client.search_runs(
    [record.info.experiment_id],
    filter_string=f"tags.mlflow.parentRunId = '{record.info.run_id}'",
    order_by=["attributes.start_time"],
):
    print(
        f"  nested: {nested.info.run_name}: accuracy "
        f"{nested.data.metrics['accuracy_score']:.4f}, artifacts",
        [a.path for a in client.list_artifacts(nested.info.run_id)],
    )
refused = client.get_model_version("tour-mnist", second.challenger_version)
print("on the version:", refused.tags["promotion_refused"])

# %% [markdown]
# A refusal leaves every alias as it was and tags the version with why
# (`promotion_refused`). **In the UI:** experiment `mnist-promotion` holds one "promote" run per
# decision, with the evaluations nested under it (their metrics, confusion matrices and
# per-class tables as artifacts); the registry's `tour-mnist` shows which version holds
# `@champion` and, on each version, its tags.

# %% [markdown]
# ## 8. MLflow Projects: `mlflow.projects.run()`
#
# An MLflow Project is a folder (or a git repository) with an `MLproject` file naming entry
# points, their parameters and commands. `mlflow.projects.run()` (or `mlflow run` in a shell)
# starts a run, then the entry point's command with the run's id in `MLFLOW_RUN_ID`; the
# command logs into that run. `env_manager="local"` runs it in the current environment
# (`virtualenv` or `uv` would build one from `python_env.yaml`, which needs a network).
# This repository's `train` entry point runs `mnistflow train`; here on 1,000 images for one
# epoch. MLflow starts the command's `python` by name, so this environment's `bin` folder
# goes first on `PATH` (an activated venv has it there already).

# %%
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@contextlib.contextmanager
def output_to(path: Path):
    """This process's stdout and stderr, and so its children's, go to path for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# The command's progress and summary go to a log file rather than onto this page.
with output_to(TOUR / "project.log"):
    submitted = mlflow.projects.run(
        str(REPO),
        entry_point="train",
        parameters={"epochs": 1, "limit_train": 1000, "system_metrics": "false"},
        env_manager="local",
        experiment_name="tour-project",
    )
print("status:", submitted.get_status(), "| run:", submitted.run_id)

project_run = client.get_run(submitted.run_id)
print("MLflow's tags:")
for key, value in sorted(project_run.data.tags.items()):
    if key.startswith("mlflow."):
        print(f"  {key} = {shown(value)}")
print(
    "the parameters MLflow passed:",
    {k: project_run.data.params[k] for k in ("epochs", "limit_train", "system_metrics")},
)
print(
    "what mnistflow logged into the same run:",
    {k: project_run.data.params[k] for k in ("train.epochs", "data.train_size")},
    f"test_accuracy {project_run.data.metrics['test_accuracy']:.4f}",
)
assert project_run.info.status == "FINISHED"

# %% [markdown]
# The project's parameters (as MLflow passed them) and mnistflow's own (`train.*`, `data.*`)
# land in the **same** run: mnistflow resumes the run MLflow started instead of opening
# another. **In the UI:** experiment `tour-project`; the run's overview shows the source
# (the repository and its git commit) and the entry point.

# %% [markdown]
# ## 9. What mnistflow adds on top
#
# **The spool, and `mnistflow sync`.** A training run never writes to its store directly: it
# writes to a local embedded store (the spool, `$MNISTFLOW_SPOOL_DIR`, default
# `~/.cache/mnistflow/spool`) and a background thread copies it to the real store. A tracking
# server that restarts or goes away, or a full disk, costs the training nothing; whatever
# could not be copied when the command ends stays in the spool, and
# `mnistflow sync` sends it later (`mnistflow sync --list` shows what waits). Every run above
# made by `plain.train_run` went that way.
#
# ```bash
# mnistflow train --tracking-uri http://mlflow.example:5000   # trains even while the server is away
# mnistflow sync                                              # later: copy what is waiting, once
# ```
#
# **Promotion by evidence.** Section 7 in one command, on the whole test set, plus the way
# back: each promotion and rollback is recorded on the versions, and `rollback` returns
# `@champion` to the one before.
#
# ```bash
# mnistflow train --register          # a new version, @challenger
# mnistflow promote                   # --min-accuracy 0.99 --margin 0.002 by default
# mnistflow rollback                  # @champion back to the previous champion
# ```
#
# **Serving.** `mnistflow serve` loads `models:/mnist@champion` and follows the alias: when
# `promote` or `rollback` moves it, the server switches to the new version without a restart.
# It answers MLflow's own `/invocations` protocol, takes PNG uploads at `/predict`, and has a
# draw-a-digit page; `mnistflow predict` classifies image files in batches with the same
# model.
#
# ```bash
# mnistflow serve                     # http://127.0.0.1:8000
# mnistflow predict sample-digits/    # PNG/JPEG files, folders, .npy, IDX
# ```
#
# The README says how each works and what was measured; `mnistflow ui` opens the MLflow UI on
# the store all of these use.
