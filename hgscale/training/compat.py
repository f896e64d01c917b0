"""Whether a checkpoint can resume this run, checked before any process group starts: the same model, the same
global batch (or checkpoint.allow_batch_change), a layout that can be converted (:mod:`hgscale.checkpoint.reshard`)
and the files a conversion reads. Each problem is one sentence naming the file or key and what would work; the
checkpoint itself is never modified.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hgscale.checkpoint.layout import describe, layout_changed, read_meta, zero_partitions
from hgscale.checkpoint.reshard import converted
from hgscale.config import Config, config_from_dict
from hgscale.training.layout import ParallelLayout

# model keys that do not shape the parameters: they may change on resume
_FREE_MODEL_KEYS = {"dropout", "attn_dropout", "attn_impl", "max_seq_len", "init", "init_std"}


def model_differences(saved: dict, cfg: Config) -> list[str]:
    """'model.KEY saved -> now' for each model key that shapes the parameters and differs."""
    then = dataclasses.asdict(config_from_dict(saved, validate=False).model)
    now = dataclasses.asdict(cfg.model)
    return [f"model.{k} {then.get(k)!r} -> {now.get(k)!r}" for k in now
            if k not in _FREE_MODEL_KEYS and then.get(k) != now.get(k)]


def _batch_problem(where: str, saved_ds: dict, cfg: Config, world_size: int) -> str | None:
    lay = ParallelLayout.unchecked(cfg, world_size)
    G, G2, m, dp = saved_ds["train_batch_size"], lay.global_batch, lay.micro, lay.dp
    if G == G2 or cfg.checkpoint.allow_batch_change:
        return None
    m0, a0 = saved_ds["train_micro_batch_size_per_gpu"], saved_ds["gradient_accumulation_steps"]
    was = (f"checkpoint {where} was trained with global batch {G} (micro_batch_size {m0} x grad_accum_steps {a0} "
           f"x data-parallel size {G // (m0 * a0)}); this run has micro_batch_size {m} x grad_accum_steps "
           f"{lay.accum} x data-parallel size {dp} = {G2}")
    if G % (m * dp) == 0:
        keep = f"set train.grad_accum_steps={G // (m * dp)} ({m} x {G // (m * dp)} x {dp} = {G}) to keep it"
    else:
        keep = (f"no grad_accum_steps reaches {G} with micro_batch_size {m} x data-parallel size {dp}: choose "
                f"train.micro_batch_size and train.grad_accum_steps with micro x accum x {dp} = {G}"
                + ("" if G % dp == 0 else f" ({G} is not divisible by {dp}: launch a world size that is)"))
    return f"{was}: {keep}, or set checkpoint.allow_batch_change=true to continue with global batch {G2}"


def missing_files(tag_dir: Path, meta: dict, names: set[str] | None = None) -> list[str]:
    """The DeepSpeed and hgscale files a conversion of ``tag_dir`` reads that are not there (``names``: the files
    the checkpoint holds, when it is on object storage; else those in ``tag_dir``)."""
    have = (lambda f: f in names) if names is not None else (lambda f: (tag_dir / f).is_file())  # noqa: E731
    topo = meta["topology"]
    stages, dp = topo["pipeline_stages"], zero_partitions(topo)
    want = [f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)] + ["rank00000.pt"]
    if topo["zero_stage"] in (1, 2) or meta["config"]["train"]["precision"] == "bf16":
        # ZeRO 1/2 write zero_pp_rank_*, DeepSpeed's bf16 optimizer bf16_zero_pp_rank_* (the same contents)
        want += [f for s in range(stages) for d in range(dp)
                 if not have("bf16_" + (f := f"zero_pp_rank_{d}_mp_rank_{s:02d}_optim_states.pt"))]
    return [f for f in want if not have(f)]


def conversion_problem(tag_dir: Path, meta: dict) -> str | None:
    """A finished conversion beside ``tag_dir`` that was made from another step (copied in by hand)."""
    conv = converted(tag_dir)
    if conv is None:
        return None
    try:
        step = json.loads((conv / "elastic.json").read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        step = "unreadable"
    if step != meta["step"]:
        return (f"checkpoint {str(tag_dir)!r} holds a conversion {str(conv)!r} of step {step}, not of its step "
                f"{meta['step']}: remove {str(conv)!r} (it is rebuilt from the checkpoint)")
    return None


def resume_problems(tag_dir: Path, cfg: Config, world_size: int, want: dict, local: bool = True,
                    names: set[str] | None = None) -> list[str]:
    """Why the checkpoint in ``tag_dir`` cannot resume this run (topology ``want``); [] when it can. ``local``: the
    checkpoint's files are here; a remote one has only its hgscale.json staged before any process group, and
    ``names`` lists the files it holds on the store (None: it holds a finished conversion, nothing to check)."""
    meta = read_meta(tag_dir)
    where = repr(str(tag_dir))
    diff = model_differences(meta["config"], cfg)
    if diff:
        return [f"checkpoint {where} holds another model ({'; '.join(diff)}): resume with its model settings, or "
                f"start fresh with checkpoint.resume=never"]
    out = []
    batch = _batch_problem(where, meta["deepspeed"], cfg, world_size)
    if batch:
        out.append(batch)
    have = meta["topology"]
    if layout_changed(have, want):
        if 3 in (have["zero_stage"], want["zero_stage"]):
            out.append(f"checkpoint {where} was written by {describe(have)}; this run is {describe(want)}: ZeRO-3 "
                       f"checkpoints are not converted between layouts; launch the same layout, or export it "
                       f"(hgscale export) and start fresh")
        elif have["zero_stage"] == 0 and meta["config"]["train"]["precision"] == "fp16":
            out.append(f"checkpoint {where} was written with ZeRO-0 and fp16: its fp32 master weights are not "
                       f"converted to another layout; launch the same layout")
        elif want["zero_stage"] == 0 and cfg.train.precision == "fp16":
            # DeepSpeed's fp16 optimizer keeps fp32 masters of its own: loading the module alone would leave them
            # at the fresh initialisation, and the first step would throw the trained weights away
            out.append(f"checkpoint {where} was written by {describe(have)}; this run is {describe(want)} with fp16, "
                       f"whose fp32 master weights a conversion does not fill: use parallel.zero_stage=1 or 2 (or "
                       f"train.precision=fp32 / bf16), or launch the checkpoint's layout")
        elif (names is not None or local and converted(tag_dir) is None) and missing_files(tag_dir, meta, names):
            gone = missing_files(tag_dir, meta, names)
            out.append(f"checkpoint {where} lacks {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}, which a "
                       f"conversion to {describe(want)} reads: copy the whole checkpoint directory, or launch its "
                       f"layout ({describe(have)}) if only other ranks' files are missing")
        elif local and conversion_problem(tag_dir, meta):
            out.append(conversion_problem(tag_dir, meta))
    return out
