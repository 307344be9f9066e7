"""The model registry: versions, aliases, the champion history and rollback.

Aliases, never stages: a new version gets @challenger; promotion (promotion.py) moves
@champion; rollback steps back through the champion history. Logging a trained network as
MLflow models is logged_models.py's job; this module only registers what was logged.

Every function takes the MlflowClient of the store to act on (see ``client_for``) and never
MLflow's process-wide URIs, so a version cannot land in another store than the one asked for.

The champion history is derived, never stored as one value: each promotion and rollback
writes one tag of its own on the version it concerns (``champion_event.<order>``), and the
history is the replay of those events in order. Two promotions at once therefore write two
tags and neither is lost, where a read-modify-write of one "history" value would drop one.
After writing its event, a writer points @champion at the replay's last version and checks
that the replay still ends there, retrying if not; the last writer to check wins, so the
alias and the history agree however the writers interleave.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

# Re-exported: the registry's default name and aliases belong with it.
from mnistflow.config import CHALLENGER as CHALLENGER
from mnistflow.config import CHAMPION as CHAMPION
from mnistflow.config import MODEL_NAME as MODEL_NAME
from mnistflow.config import MnistflowError

EVENT_PREFIX = "champion_event."
PROMOTED, ROLLED_BACK = "promoted", "rolled back"
# Written by mnistflow 0.1 as one comma-separated registered-model tag; read
# as the start of the history so that older stores keep their champions.
LEGACY_HISTORY_TAG = "champion_history"
# Concurrent writers settle in a round or two; this many means something else moves @champion.
SETTLE_ROUNDS = 50
WRITE_RETRIES = 10


def _retrying(write: Callable[..., object], *args: str) -> None:
    """Run one registry write, again if it lost a race with another writer of the same row.

    MLflow's SQL registry sets an alias or a tag by looking for it, then inserting or
    updating: two writers at once may both insert, and one gets a unique-constraint error
    (or, on sqlite, "database is locked"). The write is idempotent, so it is simply redone.
    """
    for attempt in range(WRITE_RETRIES):
        try:
            write(*args)
            return
        except MlflowException as e:
            lost_race = any(
                s in str(e).lower() for s in ("unique constraint", "database is locked")
            )
            if not lost_race or attempt == WRITE_RETRIES - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose registry is the tracking store itself, whatever MLFLOW_REGISTRY_URI or
    mlflow.set_registry_uri say: in mnistflow the registry always lives in the tracking store."""
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# -- versions -------------------------------------------------------------------------------


def _run_model_id(client: MlflowClient, run_id: str) -> str:
    """The served model (named 'model') logged by a training run."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MnistflowError(f"No run with id {run_id} in {client.tracking_uri}.") from None
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
    )
    if not models:
        raise MnistflowError(
            f"Run {run_id} has no logged model named 'model'; train it with mnistflow train."
        )
    return str(models[0].model_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        # Another registration (maybe at this very moment) created it: fine.
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def register(
    client: MlflowClient,
    run_id: str,
    name: str = MODEL_NAME,
    model_id: str | None = None,
) -> ModelVersion:
    """Register a training run's served model (model_id, else the run's model named 'model')
    as a new version of name, described and tagged from the run, and give it @challenger."""
    model_id = model_id or _run_model_id(client, run_id)
    run = client.get_run(run_id)
    accuracy = run.data.metrics.get("test_accuracy", float("nan"))
    tags = {
        "test_accuracy": f"{accuracy:.4f}",
        "run_id": run_id,
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "preset": run.data.tags.get("preset", run.data.params.get("preset", "unknown")),
        "dataset_digest": run.data.tags.get("dataset_digest", "unknown"),
    }
    description = (
        f"{tags['preset']} preset, test accuracy {accuracy:.2%}, trained on "
        f"{run.data.tags.get('device', '?')} in "
        f"{run.data.metrics.get('train_seconds', float('nan')):.1f} s (run {run_id})."
    )
    # The source is where the logged model's files are, as the client's store says. A
    # "models:/<model_id>" source would be resolved by MLflow's sqlite registry through the
    # process-wide tracking URI (its own TODO), i.e. possibly in another store.
    try:
        source = client.get_logged_model(model_id).artifact_location
    except MlflowException:
        raise MnistflowError(f"No logged model {model_id} in {client.tracking_uri}.") from None
    _ensure_registered_model(client, name)
    # The store assigns the version number, so concurrent registrations each get their own.
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_id,
    )
    _link_logged_model(client, model_id, name, str(mv.version))
    _retrying(client.set_registered_model_alias, name, CHALLENGER, str(mv.version))
    return client.get_model_version(name, mv.version)


def ensure_registered(client: MlflowClient, run_id: str, name: str, model_id: str) -> ModelVersion:
    """register, once: when a version of name already holds this run's model_id (an earlier
    try, cut off or not), its missing steps are completed instead of making a second one.

    The steps a cut-off registration may lack: the logged model's link to its version, and
    @challenger, which it takes unless a later version (registered since) or @champion has
    moved past it."""
    versions = [
        v
        for v in client.search_model_versions(f"name='{name}' AND run_id='{run_id}'")
        if getattr(v, "model_id", None) in (model_id, None)
    ]
    if not versions:
        return register(client, run_id, name, model_id)
    version = str(min(int(v.version) for v in versions))
    _link_logged_model(client, model_id, name, version)
    challenger = alias_version(client, name, CHALLENGER)
    champion = alias_version(client, name, CHAMPION)
    newer = challenger is not None and int(challenger) > int(version)
    passed = champion is not None and int(champion) >= int(version)
    if challenger != version and not newer and not passed:
        _retrying(client.set_registered_model_alias, name, CHALLENGER, version)
    return client.get_model_version(name, version)


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Tag the logged model with its registered versions, as mlflow.register_model does (the
    UI's model page links to them; an MLflow server adds the link itself). Read-modify-write:
    two registrations of one logged model at once may keep only one link; the versions
    themselves are unaffected."""
    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    link = {"name": name, "version": version}
    if link not in links:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*links, link])})


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, version, alias) of models:/<name>/<version> or models:/<name>@<alias>, else None.

    Written here because MLflow's own parser (mlflow.store.artifact.utils.models) is private.
    """
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return (name, None, alias) if name and alias and "/" not in alias else None
    name, _, version = ref.partition("/")
    return (name, version, None) if name and version.isdigit() else None


def describe_models(client: MlflowClient) -> str:
    """What exists, for error messages: 'mnist (versions 1-3; @champion=2)'."""
    parts = []
    for model in client.search_registered_models():
        versions = sorted(int(v.version) for v in _all_versions(client, model.name))
        aliases = ", ".join(f"@{a}={v}" for a, v in sorted(model.aliases.items()))
        span = f"versions {versions[0]}-{versions[-1]}" if versions else "no versions"
        parts.append(f"{model.name} ({span}{'; ' + aliases if aliases else ''})")
    return "; ".join(parts) or "no registered models"


def _all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


# -- the champion history -------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class _Event:
    nanos: int  # when it was written, made later than every event before it (see _write)
    nonce: str  # orders two events written in the same nanosecond, the same everywhere
    version: str
    kind: str  # PROMOTED or ROLLED_BACK


def _events(client: MlflowClient, name: str) -> list[_Event]:
    events = []
    for mv in _all_versions(client, name):
        for key, kind in mv.tags.items():
            if key.startswith(EVENT_PREFIX):
                nanos, _, nonce = key.removeprefix(EVENT_PREFIX).partition(".")
                events.append(_Event(int(nanos), nonce, str(mv.version), kind))
    return sorted(events)


def _replay(client: MlflowClient, name: str) -> tuple[list[str], list[_Event]]:
    """The champion history (oldest first) and the events it was replayed from."""
    try:
        legacy = client.get_registered_model(name).tags.get(LEGACY_HISTORY_TAG, "")
    except MlflowException:
        raise MnistflowError(
            f"No registered model {name!r}; there is: {describe_models(client)}."
        ) from None
    history = [v for v in legacy.split(",") if v]
    events = _events(client, name)
    for event in events:
        # Promoting the champion again, or a rollback that another one already did (both
        # possible only when two writers race), changes nothing: no version follows itself.
        if event.kind == PROMOTED and history[-1:] != [event.version]:
            history.append(event.version)
        elif event.kind == ROLLED_BACK and len(history) >= 2 and history[-1] == event.version:
            history.pop()
    return history, events


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """The versions that were @champion, oldest first; the last one is @champion now."""
    return _replay(client, name)[0]


def _write(client: MlflowClient, name: str, version: str, kind: str, after: list[_Event]) -> None:
    # Later than every event seen, even if this machine's clock is behind the last writer's,
    # so that one writer after another always lands in the order they ran.
    nanos = max([time.time_ns(), *(e.nanos + 1 for e in after)])
    key = f"{EVENT_PREFIX}{nanos:020d}.{secrets.token_hex(4)}"
    client.set_model_version_tag(name, version, key, kind)


def _tag(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        _retrying(client.set_model_version_tag, name, version, key, value)


def _settle_champion(client: MlflowClient, name: str) -> str:
    """Point @champion at the history's last version until the history stops moving."""
    history = champion_history(client, name)
    for _ in range(SETTLE_ROUNDS):
        _retrying(client.set_registered_model_alias, name, CHAMPION, history[-1])
        again = champion_history(client, name)
        if again[-1] == history[-1]:
            return history[-1]
        history = again
    raise MnistflowError(
        f"@champion of {name} kept moving while it was set; try again when other promotions end."
    )


def make_champion(client: MlflowClient, name: str, version: str, reason: str) -> bool:
    """Point @champion at version and add it to the champion history; returns False (and
    changes nothing) when version is already the champion."""
    history, events = _replay(client, name)
    if history[-1:] == [version]:
        _settle_champion(client, name)  # in case the alias was moved by hand
        return False
    _write(client, name, version, PROMOTED, events)
    _tag(client, name, version, {"promoted_at": _now(), "promotion_reason": reason})
    _settle_champion(client, name)
    return True


def rollback(client: MlflowClient, name: str = MODEL_NAME) -> tuple[str, str]:
    """Move @champion back to the previous champion; returns (from_version, to_version)."""
    history, events = _replay(client, name)
    if len(history) < 2:
        raise MnistflowError(
            f"{name} has no earlier champion to roll back to (champion history: "
            f"{', '.join(history) or 'empty'})."
        )
    current, previous = history[-1], history[-2]
    _write(client, name, current, ROLLED_BACK, events)
    _tag(client, name, current, {"rolled_back_at": _now()})
    _settle_champion(client, name)
    return current, previous
