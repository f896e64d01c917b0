"""What the tracker hands to the MLflow delivery thread (``mlflow_sink``), and how it outlives the process.

The record types travel through the sink's queue in order. MLflow's limits on names and sizes are applied
here (``clean_key``, the ``MAX_*`` lengths) so the tracker and the rank-0 aggregation name metrics the way
the store will accept them; ``batch_entities`` turns consecutive metrics/params/tags into the entities of
one round of ``log_batch`` calls. Records a closing sink could not deliver go to a spool file (JSON lines,
one record a line, tagged with its run id) that the next sink of the same run replays.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

MAX_METRICS_PER_BATCH = 1000      # MLflow log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
MAX_KEY_LEN = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


@dataclass(frozen=True)
class Metrics:
    step: int
    timestamp_ms: int   # when it was logged: a retried batch is stored once
    values: dict


@dataclass(frozen=True)
class Params:
    values: dict


@dataclass(frozen=True)
class Tags:
    values: dict


@dataclass(frozen=True)
class Artifact:
    path: str
    artifact_path: str | None = None
    staged: bool = False   # ``path`` is a copy in a directory of its own, deleted once uploaded


@dataclass(frozen=True)
class Status:
    status: str          # FINISHED / KILLED / FAILED
    end_time_ms: int     # when the run ended, not when the record got through


@dataclass(frozen=True)
class Call:
    fn: Callable = field(repr=False)   # fn(client, run_id), e.g. the end-of-run plot


Record = Metrics | Params | Tags | Artifact | Status | Call
BATCHED = (Metrics, Params, Tags)   # records that go to MLflow together in one log_batch
_SPOOLED = {cls.__name__: cls for cls in (Metrics, Params, Tags, Artifact)}  # a Status or Call is not replayed


def with_values(rec, values: dict):
    """A copy of a batched record carrying ``values`` instead of its own."""
    return type(rec)(**{**asdict(rec), "values": values})


def clean_key(key) -> str:
    """An MLflow-valid name: alphanumerics, _ - . space and /; no leading or repeated slash."""
    k = _BAD_KEY_CHARS.sub("_", str(key))
    k = re.sub(r"/+", "/", k).strip("/") or "_"
    return k[:MAX_KEY_LEN]


def batch_entities(pending, existing_params: dict[str, str]) -> tuple[int, list, list, list]:
    """(n, Metric, Param and RunTag entities) of the leading ``n`` >= 1 batched records of ``pending``: as many
    as one round of log_batch calls takes. ``existing_params``: the run's params already in the store."""
    from mlflow.entities import Metric, Param, RunTag

    metrics, params, tags = [], [], []
    n = 0
    for item in pending:
        if not isinstance(item, BATCHED):
            break
        if isinstance(item, Metrics):
            new = [Metric(k, v, item.timestamp_ms, item.step) for k, v in item.values.items()]
            if len(metrics) + len(new) > MAX_METRICS_PER_BATCH and n:
                break
            metrics += new
        else:
            entries = params_or_tags(item, existing_params)
            p = [Param(k, v) for k, v in entries.get("params", {}).items()]
            t = [RunTag(k, v) for k, v in entries.get("tags", {}).items()]
            if n and (len(params) + len(p) > MAX_PARAMS_TAGS_PER_BATCH
                      or len(tags) + len(t) > MAX_PARAMS_TAGS_PER_BATCH):
                break
            params += p
            tags += t
        n += 1
        if len(metrics) + len(params) + len(tags) >= MAX_METRICS_PER_BATCH:
            break
    return n, metrics, params, tags


def params_or_tags(item: Params | Tags, existing_params: dict[str, str]) -> dict:
    """Params go to MLflow once; on a resumed run a changed value is recorded as a tag instead of failing."""
    if isinstance(item, Tags):
        return {"tags": {clean_key(k): str(v)[:MAX_TAG_LEN] for k, v in item.values.items()}}
    params, tags = {}, {}
    for k, v in item.values.items():
        k, v = clean_key(k), str(v)[:MAX_PARAM_LEN]
        old = existing_params.get(k)
        if old is None:
            params[k] = v
        elif old != v:
            tags[clean_key(f"param_changed_on_resume/{k}")] = v[:MAX_TAG_LEN]
    return {"params": params, "tags": tags}


def spoolable(records) -> list:
    """The records of ``records`` a spool file keeps (metrics, params, tags, artifacts)."""
    return [r for r in records if type(r).__name__ in _SPOOLED]


def append_spool(path: Path, run_id: str | None, records: list) -> None:
    """Append ``records`` (see ``spoolable``) to the spool file at ``path``; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps({"run_id": run_id, "kind": type(rec).__name__, **asdict(rec)}) + "\n")


def take_spooled(path: Path, run_id: str | None) -> list[Record]:
    """The records spooled for ``run_id`` or for a run that never got an id, in spool order; they leave the
    file (other runs' lines stay, the file goes once empty)."""
    if not path.is_file():
        return []
    keep, taken = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("run_id") in (None, run_id) and rec.get("kind") in _SPOOLED:
            rec.pop("run_id", None)
            taken.append(_SPOOLED[rec.pop("kind")](**rec))
        else:
            keep.append(line)
    if keep:
        path.write_text("\n".join(keep) + "\n")
    else:
        path.unlink()
    return taken
