"""lm-evaluation-harness (lm_eval >= 0.4) on a trained model: the registered ``hgscale`` model class and the run
behind ``hgscale evaluate --harness TASKS``. Importing this module imports lm_eval; nothing else in hgscale does.

    results = run_harness("runs/demo/checkpoints", ["my_task"], include=["my_tasks/"], limit=100)
    # or lm_eval's own API, once this module is imported:
    lm_eval.simple_evaluate(model="hgscale", model_args="checkpoint=runs/demo/checkpoints", tasks=[...])

The model is ours, on one device (no transformers): :class:`~hgscale.evaluation.textlm.TextLM` scores requests
with full forwards in batches, rolls whole documents through the sliding windows of ``hgscale evaluate`` and
generates with the incremental decoding cache.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from hgscale.evaluation.textlm import HarnessError, TextLM

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise HarnessError(f"lm-evaluation-harness (lm_eval >= 0.4) cannot be imported (no module {e.name!r}); install "
                       f"the hf extra: pip install -e \".[hf]\"") from None

#: the request types of lm_eval tasks this model answers
SERVED = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device in ("auto", None) else device


@register_model("hgscale")
class HgscaleLM(LM):
    """An hgscale checkpoint as an lm_eval model: ``model_args`` checkpoint (or pretrained) = a training checkpoint
    or an exported directory; device, batch_size, chunk, context_chunks (rolling windows), data_url (where the
    tokenizer and modality are read), seed (sampling), max_gen_toks."""

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, device: str = "auto",
                 batch_size: int | str = 8, max_batch_size: int | None = None, chunk: int = 128,
                 context_chunks: int | None = None, data_url: str | None = None, seed: int = 1234,
                 max_gen_toks: int = 256, text_lm: TextLM | None = None):
        super().__init__()  # max_batch_size: lm_eval passes it for automatic batch sizes, which this model lacks
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise HarnessError(f"batch_size {batch_size!r} must be an integer (no automatic batch size)") from None
        if text_lm is None:
            path = checkpoint or pretrained
            if not path:
                raise HarnessError("the hgscale model needs model_args checkpoint=DIR (a training checkpoint or an "
                                   "exported directory)")
            text_lm = TextLM.load(path, resolve_device(device), data_url, batch_size=batch_size, chunk=int(chunk),
                                  context_chunks=None if context_chunks is None else int(context_chunks),
                                  seed=int(seed))
        self.lm, self.checkpoint, self.max_gen_toks = text_lm, str(checkpoint or pretrained or ""), int(max_gen_toks)
        self._device = text_lm.device

    @property
    def batch_size(self) -> int:
        return self.lm.batch_size

    def get_model_info(self) -> dict:
        """Recorded in the results' config beside lm_eval's own entries."""
        return {"model": "hgscale", "checkpoint": self.checkpoint, "tokenizer": self.lm.codec.kind,
                "max_seq_len": self.lm.max_len, "chunk": self.lm.chunk, "context_chunks": self.lm.context_chunks}

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = self.lm.loglikelihood([r.args for r in requests])
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = [ll for ll, _ in self.lm.rolling([r.args[0] for r in requests])]
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return out

    def generate_until(self, requests) -> list[str]:
        """Requests with the same generation settings are generated together."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for idx in groups.values():
            until, max_tokens, temperature = self._settings(requests[idx[0]].args[1])
            texts = self.lm.generate([requests[i].args[0] for i in idx], until, max_tokens, temperature)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _settings(self, gen_kwargs: dict) -> tuple[list[str], int, float]:
        """(until strings, max new tokens, temperature) of a request: greedy unless do_sample, as lm_eval's hf model
        (temperature 1 when sampling without one)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise HarnessError(f"generation setting until = {until!r} must be a string or a list of strings")
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
        return until, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), temperature

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        raise HarnessError("hgscale models are base language models without a chat template: run harness tasks "
                           "without apply_chat_template")

    @property
    def tokenizer_name(self) -> str:
        return f"hgscale-{self.lm.codec.kind}"


# ----------------------------------------------------------------------------------------------------- tasks

@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _builtin_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _unknown(names: list[str], tm, include: tuple[str, ...]) -> None:
    import difflib

    for name in names:
        if name in tm.all_tasks or Path(name).is_file():
            continue
        near = difflib.get_close_matches(name, tm.all_tasks, n=3)
        where = f"lm_eval's built-in tasks ({_builtin_dir()})" + (f" and {', '.join(include)}" if include else "")
        raise HarnessError(f"unknown harness task {name!r}" + (f" (close: {', '.join(near)})" if near else "") +
                           f": tasks are looked for in {where}; to run your own task, put its YAML in a directory "
                           f"and pass --harness-include DIR")


class _NeedsDefaults(Exception):
    """A local task or group names something outside the include directories."""


def _load(tm, names: list[str], defaults: bool) -> dict:
    try:
        return tm.load(list(names))
    except Exception as e:  # noqa: BLE001 - a task's YAML, code or dataset: lm_eval passes on whatever they raise
        if isinstance(e, KeyError) and not defaults:
            raise _NeedsDefaults from None
        raise HarnessError(f"harness task(s) {', '.join(names)} could not be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); a task's data must be local or already in "
                           f"the Hugging Face cache when offline") from None


def check_capabilities(tasks: dict) -> None:
    """Refuse, before any work, a task that needs what the model lacks: images or audio, an unknown request type."""
    for name, task in tasks.items():
        if getattr(task, "MULTIMODAL", False):
            raise HarnessError(f"harness task {name!r} needs multimodal input (images or audio: doc_to_image / "
                               f"doc_to_audio), which hgscale's text models do not take")
        kind = task.get_config("output_type") or getattr(task, "OUTPUT_TYPE", None)
        if kind not in SERVED:
            raise HarnessError(f"harness task {name!r} asks for output type {kind!r}; the hgscale model serves "
                               f"{', '.join(SERVED)}")


def load_tasks(names: list[str], include: list[str] = ()) -> tuple[object, list]:
    """(TaskManager, the requested tasks and groups, built), after the checks of :func:`check_capabilities`. Tasks all
    found in ``include`` load without indexing lm_eval's ~15k built-in tasks (seconds); include directories take
    precedence over built-in tasks of the same name in lm_eval too."""
    include = tuple(str(d) for d in include)
    for d in include:
        if not Path(d).is_dir():
            raise HarnessError(f"--harness-include {d}: no such directory (it should hold task YAML files)")
    loaded = None
    if include and all(n in _manager(include, False).all_tasks for n in names):
        tm = _manager(include, False)
        try:
            loaded = _load(tm, names, defaults=False)
        except _NeedsDefaults:
            loaded = None
    if loaded is None:
        tm = _manager(include, True)
        _unknown(names, tm, include)
        loaded = _load(tm, names, defaults=True)
    check_capabilities(loaded["tasks"])
    groups = loaded["groups"]
    inner_groups = {s.name for g in groups.values() for s in g.get_all_groups()}
    inner_tasks = {t.task_name for g in groups.values() for t in g.get_all_tasks()}
    top = [g for n, g in groups.items() if n not in inner_groups]
    return tm, top + [t for n, t in loaded["tasks"].items() if n not in inner_tasks]


# ------------------------------------------------------------------------------------------------------- run

def run_harness(checkpoint: str, tasks: list[str], include: list[str] = (), limit: float | None = None,
                batch_size: int = 8, device: str = "auto", chunk: int = 128, context_chunks: int | None = None,
                data_url: str | None = None, bootstrap_iters: int = 100000) -> dict:
    """lm_eval's simple_evaluate of ``tasks`` with the hgscale model of ``checkpoint``: its results dict."""
    from lm_eval.evaluator import simple_evaluate

    lm = HgscaleLM(checkpoint, device=device, batch_size=batch_size, chunk=chunk, context_chunks=context_chunks,
                   data_url=data_url)
    tm, built = load_tasks(tasks, include)
    results = simple_evaluate(model=lm, tasks=built, task_manager=tm, limit=limit, batch_size=batch_size,
                              device=str(lm.device), log_samples=False, bootstrap_iters=bootstrap_iters)
    results["config"]["model"] = "hgscale"
    return results


def tracked_metrics(results: dict) -> dict[str, float]:
    """The numeric scores of every task and group as MLflow metrics: harness/<task>/<metric>."""
    import math

    from hgscale.tracking.names import harness_metric

    out = {}
    for task, scores in results.get("results", {}).items():
        for key, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[harness_metric(task, key)] = float(value)
    return out
