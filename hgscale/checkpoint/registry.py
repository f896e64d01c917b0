"""A checkpoint into the MLflow Model Registry: logged into the run that trained it as a pyfunc model (prompts in,
completions out) and registered as a new version of a named model.

    uri, version = register("runs/enwik8_xl/checkpoints", "hourglass-enwik8")    # "models:/hourglass-enwik8/3", 3
    mlflow.pyfunc.load_model(uri).predict(["The "], params={"max_tokens": 20, "temperature": 0})

The model is MLflow 3 "models from code" (:mod:`hgscale.checkpoint.pyfunc_model`, nothing pickled), with the
exported weights and config.json as its artifact ``model`` and the hgscale package shipped in ``code_paths``: a
serving environment needs only the pinned requirements (mlflow, torch, safetensors), and the model keeps the code
it was registered with. The run's test scores at the checkpoint's step (``test/*``, from ``hgscale evaluate``) go
into the model's metadata and the version's tags; the run's params (the flattened config) become the logged
model's params. Credentials never leave the environment: the checkpoint's config is stored masked, and messages
name the tracking URI masked.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from hgscale.checkpoint.layout import CheckpointError, resolve
from hgscale.core.secrets import mask_value
from hgscale.core.storage import StorageUnavailable


class RegistryError(CheckpointError):
    """A model that cannot be registered as asked (another model under the name); the message names the fix."""


#: what a serving environment installs; hgscale itself travels with the model (code_paths)
SERVING_PACKAGES = ("mlflow", "torch", "safetensors")
# while probing the server: fail in seconds, not after MLflow's default 7 retries with growing back-off
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def signature():
    """Prompts -> completions (strings), with the generation parameters. The input column is unnamed: MLflow then
    takes a list of strings as well as a DataFrame of one string column (``prompt``); a named one refuses lists."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from hgscale.checkpoint.pyfunc_model import PARAMS

    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([ColSpec(DataType.string)]),
                          params=ParamSchema([ParamSpec("max_tokens", DataType.long, PARAMS["max_tokens"]),
                                              ParamSpec("temperature", DataType.double, PARAMS["temperature"]),
                                              ParamSpec("top_p", DataType.double, PARAMS["top_p"])]))


def requirements() -> list[str]:
    """Exact pins of what serving imports (a local build label such as +cpu dropped: pip resolves the wheel)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in SERVING_PACKAGES]


def _training_run(checkpoint, tag):
    from hgscale.checkpoint.layout import read_meta
    from hgscale.checkpoint.run_link import checkpoint_run

    path = Path(checkpoint) / tag if tag else Path(checkpoint)
    root, found = resolve(path)  # a missing checkpoint is named as such, not as one without a run
    run = checkpoint_run(path)
    if run is not None:
        return run
    if read_meta(root / found).get("run_id"):  # a run, on a server whose credentials the checkpoint keeps masked
        raise CheckpointError(f"checkpoint {str(path)!r} was tracked on a server whose URI held credentials, which "
                              f"checkpoints keep masked: set MLFLOW_TRACKING_URI to that URI, credentials included")
    raise CheckpointError(f"checkpoint {str(path)!r} belongs to no MLflow run (it was trained with tracking off), "
                          f"and a registered model is logged into the run that trained it: train with "
                          f"tracking.enabled=true (and tracking.uri or MLFLOW_TRACKING_URI naming the server) to "
                          f"register its models; without --register the export needs no run")


@contextlib.contextmanager
def _env(values: dict):
    """Set environment variables the user has not set, for the duration; restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if old[k] is None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """mlflow's Model.log and register_model talk to the process's tracking URI: use ``uri`` for the duration, then
    put back both the URI set in this process (if any) and MLFLOW_TRACKING_URI, which set_tracking_uri overwrites
    and, when restoring an unset URI, deletes."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _reason(e: Exception) -> str:
    """The gist of a connection failure (urllib3 nests it several levels deep), credentials masked."""
    text = mask_value(str(e))
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return m.group(1).strip() if m else f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _fetch_run(client, run):
    """The training run, after a quick check that the server answers at all."""
    from mlflow.exceptions import MlflowException

    where = mask_value(run.tracking_uri)
    try:
        with _env(_PROBE_ENV):
            got = client.get_run(run.run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise CheckpointError(f"MLflow run {run.run_id}, which trained this checkpoint, is not in the tracking "
                                  f"store {where}: point MLFLOW_TRACKING_URI (or tracking.uri) at the store that "
                                  f"holds it") from None
        raise StorageUnavailable(f"the MLflow tracking server {where} cannot be reached ({_reason(e)}): start it, or "
                                 f"set MLFLOW_TRACKING_URI to the server that holds run {run.run_id}") from None
    except Exception as e:  # noqa: BLE001 - a store that cannot be opened at all (a bad sqlite path, a bad host)
        raise StorageUnavailable(f"the MLflow tracking store {where} cannot be opened ({_reason(e)}): set "
                                 f"MLFLOW_TRACKING_URI to the store that holds run {run.run_id}") from None
    if got.info.lifecycle_stage == "deleted":
        raise CheckpointError(f"MLflow run {run.run_id}, which trained this checkpoint, is deleted in {where}: "
                              f"restore it (mlflow runs restore --run-id {run.run_id}) to register its model")
    return got


def _latest_version(client, name: str):
    """The newest version registered under ``name``, or None (no such model, or one without versions)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"{name!r} cannot name a registered model: {mask_value(e.message)[:300]}") from None
    quoted = f'"{name}"' if "'" in name else f"'{name}'"  # the filter grammar's string literals
    versions = client.search_model_versions(f"name = {quoted}")
    return max(versions, key=lambda v: int(v.version), default=None)


def _check_compatible(client, name: str, ours) -> None:
    """A name that already holds versions takes a new one only with the same signature: whoever loads
    ``models:/NAME/latest`` must not find other inputs, outputs or parameters."""
    import mlflow
    from mlflow.exceptions import MlflowException

    latest = _latest_version(client, name)
    if latest is None:
        return
    try:
        theirs = mlflow.models.get_model_info(f"models:/{name}/{latest.version}").signature
    except MlflowException as e:  # its files are gone, or it is not an MLflow model
        raise RegistryError(f"registered model {name!r} already exists, and the signature of its version "
                            f"{latest.version} cannot be read ({mask_value(e.message)[:200]}): register under another "
                            f"name (--register NAME)") from None
    if theirs is None:
        diff = ["it has no signature"]
    else:
        t, o = theirs.to_dict(), ours.to_dict()
        diff = [f"{part} {t.get(part)} there, {o.get(part)} here" for part in ("inputs", "outputs", "params")
                if t.get(part) != o.get(part)]
    if diff:
        raise RegistryError(f"registered model {name!r} already exists, and its version {latest.version} has another "
                            f"signature than this hgscale model ({'; '.join(diff)}): register under another name "
                            f"(--register NAME)")


def _test_metrics(client, run, got) -> dict[str, float]:
    """The run's test/* metrics logged at this checkpoint's step (hgscale evaluate logs them there)."""
    out = {}
    for key in sorted(k for k in got.data.metrics if k.startswith("test/")):
        at_step = [m for m in client.get_metric_history(run.run_id, key) if m.step == run.step]
        if at_step:
            out[key] = max(at_step, key=lambda m: m.timestamp).value
    return out


def _descriptions(run, cfg: dict, metrics: dict, checkpoint) -> tuple[dict, dict]:
    """(MLmodel metadata, model version tags): where the model came from and how well it scores."""
    m = cfg.get("model", {})
    model = {k: m.get(k) for k in ("hierarchy", "size", "vocab_size", "max_seq_len") if m.get(k) is not None}
    metadata = {"hgscale": {"run_id": run.run_id, "step": run.step, "test_metrics": metrics, "model": model,
                            "data_url": mask_value(str(cfg.get("data", {}).get("url", "")))}}
    tags = {"hgscale.step": str(run.step), "hgscale.checkpoint": mask_value(str(checkpoint)),
            **{f"hgscale.model.{k}": str(v) for k, v in model.items()}, **{k: repr(v) for k, v in metrics.items()}}
    return metadata, tags


def _log(run, export_dir: Path, metadata: dict, sig):
    import mlflow

    import hgscale
    from hgscale.checkpoint import pyfunc_model

    example = ["The "] if metadata["hgscale"]["model"].get("vocab_size") == 256 else ["1,2,3"]
    # Model.log is what mlflow.pyfunc.log_model calls; it alone takes run_id, which logs into the finished
    # training run without reopening it (start_run would mark it running and then move its end time)
    return mlflow.models.Model.log(
        artifact_path=None, flavor=mlflow.pyfunc, flavor_name="pyfunc.ModelFromCode",
        name="hourglass", python_model=pyfunc_model.__file__, artifacts={"model": str(export_dir)},
        code_paths=[str(Path(hgscale.__file__).parent)], signature=sig,
        input_example=(example, {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}),
        pip_requirements=requirements(), metadata=metadata, run_id=run.run_id,
        step=run.step)  # links the run's metrics at the checkpoint's step (val/*, test/*) to the logged model


def register(checkpoint: str | Path, name: str, tag: str | None = None) -> tuple[str, int]:
    """Log the checkpoint into its training run as a pyfunc model and register it as a new version of ``name``;
    returns (``models:/NAME/VERSION``, VERSION). Raises CheckpointError (no run, another model under ``name``) or
    StorageError (the tracking server cannot be reached)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from hgscale.checkpoint.export import export

    run = _training_run(checkpoint, tag)
    with _tracking_uri(run.tracking_uri):
        client = MlflowClient(run.tracking_uri)
        got = _fetch_run(client, run)
        sig = signature()
        _check_compatible(client, name, sig)
        metrics = _test_metrics(client, run, got)
        with tempfile.TemporaryDirectory(prefix="hgscale-register-") as tmp:
            out = export(checkpoint, Path(tmp) / "model", tag)  # the checkpoint's config is stored masked
            metadata, tags = _descriptions(run, json.loads((out / "config.json").read_text()), metrics, checkpoint)
            info = _log(run, out, metadata, sig)
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    return f"models:/{name}/{version.version}", int(version.version)
