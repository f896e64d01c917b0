"""Elastic resume: a checkpoint written by one layout (pipeline stages, data-parallel size, ZeRO stage) resumes
on another, through one per-parameter form of the training state.

    problems = resume_problems(tag_dir, cfg, world_size)   # hgscale.checkpoint.compat: before any process group
    conv = convert(tag_dir)          # once; <tag_dir>/elastic/ (atomic, reused by later resumes)
    state = load_resharded(manager, root, tag)             # every rank of the new layout, after engine set-up

The per-parameter form, kept beside DeepSpeed's files of the step::

    <tag_dir>/elastic/elastic.json        source layout, Adam step, lr scheduler, DeepSpeed counters, loss scale
    <tag_dir>/elastic/params/<name>.pt    {"fp32", "exp_avg", "exp_avg_sq"} of one parameter, full shape;
                                          <name> as in HourglassLM's state dict ("layers.5.block.ln1.weight")

It is built from DeepSpeed's own checkpoint files, whatever wrote them: ZeRO 1/2 (with or without a
pipeline; ``bf16_zero_pp_rank_*`` for DeepSpeed's bf16 optimizer, the same contents) keep each rank's flat fp32
partition and Adam moments in ``zero_pp_rank_{d}_mp_rank_{s}_optim_states.pt``
with ``param_slice_mappings`` (name -> numel, start in that rank's partition); ZeRO-0 keeps torch's optimizer
state in ``mp_rank_{s}_model_states.pt``, indexed in parameter order. DeepSpeed's universal-checkpoint tools
(ds_to_universal + load_universal) cover only part of this: they match parameters by module name (a pipeline
names them "<layer>.<rest>", the data-parallel module "model.layers.<layer>.<rest>"), and fail for a ZeRO-0
source or target. So one path serves every pair: read DeepSpeed's files into the form above, and load it into
the new engine through DeepSpeed's public ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
(ZeRO 1/2) or torch's optimizer state (ZeRO-0). ZeRO-3 is not converted (its files partition the weights too).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from hgscale.checkpoint.layout import (
    CONVERTED,
    CheckpointError,
    atomic_write,
    describe,
    fsync_dir,
    fsync_tree,
    rank_file,
    read_meta,
    zero_partitions,
)

_STATES = ("fp32", "exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------ reading
def _canonical(name: str) -> str:
    """HourglassLM name of a DeepSpeed module parameter: '5.x.w' (pipeline) or 'model.layers.5.x.w'."""
    return name.removeprefix("model.") if name.startswith("model.") else f"layers.{name}"


def _stage_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {str(tag_dir)!r} holds no DeepSpeed model states "
                              f"(mp_rank_*_model_states.pt)")
    return files


def partition_file(tag_dir: Path, dp_rank: int, stage: int) -> Path | None:
    """The optimizer partition of (dp_rank, stage): ZeRO 1/2 write ``zero_pp_rank_*``, DeepSpeed's bf16 optimizer
    (bf16 with ZeRO 0/1) ``bf16_zero_pp_rank_*``, with the same contents; plain ZeRO-0 writes none."""
    for prefix in ("", "bf16_"):
        f = tag_dir / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt"
        if f.is_file():
            return f
    return None


def _load_mapped(f: Path) -> dict:
    """A DeepSpeed file with its tensors memory-mapped: slices are read from disk when touched, so a conversion holds
    one parameter's state at a time, not a partition's (our own run's files: DeepSpeed's loader trust)."""
    return torch.load(f, map_location="cpu", weights_only=False, mmap=True)


def _zero_stage_state(tag_dir: Path, stage: int, dp: int, shapes: list[dict]):
    """ZeRO 1/2: yields (name, {fp32, exp_avg, exp_avg_sq}) of one pipeline stage parameter by parameter, each
    gathered from the dp partitions that hold a fragment of it; then (None, (adam step, loss scaler))."""
    osds = [_load_mapped(partition_file(tag_dir, d, stage))["optimizer_state_dict"] for d in range(dp)]
    step = None
    for g, group in enumerate(shapes):
        flats = []  # per partition: its flat fp32 and moments of group g (moments keep the alignment padding)
        for osd in osds:
            state = osd["base_optimizer_state"]["state"][g]
            flats.append({"fp32": osd["single_partition_of_fp32_groups"][g], **{k: state[k] for k in _STATES[1:]}})
            step = float(state["step"])
        for name, shape in group.items():
            frags = [(flat, osd["param_slice_mappings"][g][name]) for flat, osd in zip(flats, osds, strict=True)
                     if name in osd["param_slice_mappings"][g]]
            yield name, {k: torch.cat([flat[k].narrow(0, fr.start, fr.numel) for flat, fr in frags]).view(shape)
                         for k in _STATES}
    yield None, (step, osds[-1].get("loss_scaler"))


def _zero0_stage_state(tag_dir: Path, states: dict, meta: dict, stage: int):
    """ZeRO-0: yields (name, {fp32, exp_avg, exp_avg_sq}) parameter by parameter, weights from the module (or the
    pipeline's layer files), moments from torch's optimizer state, all memory-mapped; then (None, (adam step, None))."""
    buffers = set(states.get("buffer_names") or [])
    if meta["topology"]["pipeline_stages"] > 1:
        parts = meta["topology"]["stage_boundaries"]
        weights = {}
        for layer in range(parts[stage], parts[stage + 1]):
            sd = _load_mapped(tag_dir / f"layer_{layer:02d}-model_states.pt")
            weights.update({f"{layer}.{k}": v for k, v in sd.items()})
    else:
        weights = states["module"]
    names = [k for k in weights if k not in buffers]  # the order of module.parameters(): optimizer indices
    opt = states["optimizer"]
    step = 0.0
    for group in opt["param_groups"]:
        for i in group["params"]:
            st = opt["state"].get(i)
            w = weights[names[i]].float()
            if st is None:  # never stepped: zero moments
                st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}
            yield names[i], {"fp32": w.clone(), **{k: st[k].float() for k in _STATES[1:]}}
            step = float(st["step"])
    yield None, (step, None)


def _pending(conv: Path) -> list[Path]:
    return [p for p in conv.parent.glob(f".{CONVERTED}.tmp*") if p.is_dir()]


def converted(tag_dir: Path) -> Path | None:
    """The finished conversion of ``tag_dir``, if any (an interrupted one has another name and is ignored)."""
    conv = Path(tag_dir) / CONVERTED
    return conv if (conv / "elastic.json").is_file() else None


def convert(tag_dir: str | Path) -> tuple[Path, bool]:
    """(<tag_dir>/elastic, True if built now / False if reused). One process, no process group; written under a
    temporary name and renamed when complete, so a conversion cut short is never read."""
    tag_dir = Path(tag_dir)
    done = converted(tag_dir)
    if done:
        return done, False
    meta = read_meta(tag_dir)
    topo = meta["topology"]
    for old in _pending(tag_dir / CONVERTED):  # debris of an interrupted conversion
        shutil.rmtree(old, ignore_errors=True)
    tmp = tag_dir / f".{CONVERTED}.tmp{os.getpid()}"
    (tmp / "params").mkdir(parents=True)
    step, scaler, counters = 0.0, None, None
    for stage, f in enumerate(_stage_files(tag_dir)):
        states = _load_mapped(f)
        if counters is None:
            counters = {k: states.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}
            counters["lr_scheduler"] = states.get("lr_scheduler")
        if partition_file(tag_dir, 0, stage) is None:  # torch's optimizer state, unpartitioned
            params = _zero0_stage_state(tag_dir, states, meta, stage)
        else:
            params = _zero_stage_state(tag_dir, stage, zero_partitions(topo), states["param_shapes"])
        del states  # the generator keeps what it reads, memory-mapped
        for name, st in params:
            if name is None:
                step, scaler = st
                continue
            torch.save(st, tmp / "params" / f"{_canonical(name)}.pt")
    info = {"source": topo, "step": meta["step"], "adam_step": step, "time": time.time(), **counters,
            "loss_scaler": _scaler_dict(scaler)}
    fsync_tree(tmp)  # every parameter file on disk before elastic.json says the conversion is finished
    atomic_write(tmp / "elastic.json", json.dumps(info, indent=1, default=str))
    final = tag_dir / CONVERTED
    os.replace(tmp, final)  # the directory appears whole or not at all
    fsync_dir(tag_dir)
    return final, True


def convert_before_start(tag_dir: Path, rank: int, poll_s: float = 1.0, say=print) -> Path:
    """Rank 0 converts ``tag_dir`` (or reuses its conversion); every other rank waits until the finished conversion
    appears (it is renamed into place whole). No process group: a launcher ends the waiting ranks if rank 0 dies."""
    if rank == 0:
        t0 = time.perf_counter()
        conv, built = convert(tag_dir)
        if built:
            say(f"converted {tag_dir} for this layout in {time.perf_counter() - t0:.1f} s (kept in {conv})",
                flush=True)
        return conv
    t0 = time.monotonic()
    while (conv := converted(tag_dir)) is None:
        time.sleep(poll_s)
        if int(time.monotonic() - t0) % 300 == 0:
            say(f"rank {rank}: waiting for rank 0 to convert {tag_dir} ({time.monotonic() - t0:.0f} s)", flush=True)
    return conv


def _scaler_dict(scaler) -> dict | None:
    if scaler is None:
        return None
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {k: float(getattr(scaler, k)) for k in keys if hasattr(scaler, k)}


# ------------------------------------------------------------------------------------------ loading
def _flat_partitions(optimizer) -> list | None:
    """The flat fp32 partitions of DeepSpeed's ZeRO 1/2 or bf16 optimizer; None for torch's own (ZeRO-0)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attr):
            return getattr(optimizer, attr)
    return None


def link_zero_optimizer_state(zero_optimizer) -> None:
    """ZeRO 1/2 (and the bf16 optimizer) create Adam's state at the first step and only then link each parameter to its
    fragment of it (which ``safe_set_full_optimizer_state`` writes through). A freshly built engine gets
    zero state and the links now. The only DeepSpeed internals used here, in one place (tested by the
    elastic-resume integration tests)."""
    inner = zero_optimizer.optimizer
    for flat in _flat_partitions(zero_optimizer):  # (partition numel,) fp32 of this rank
        st = inner.state[flat]
        if not st:
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def _load_into_engine(eng, conv: Path, info: dict) -> None:
    """Weights, fp32 masters and Adam moments of every local parameter; step counters; lr scheduler."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds = eng.engine
    step = torch.tensor(float(info["adam_step"]))
    if _flat_partitions(ds.optimizer) is not None:
        link_zero_optimizer_state(ds.optimizer)
    plain = None  # torch's optimizer when DeepSpeed does not partition it (ZeRO-0)
    for name, p in ds.module.named_parameters():
        st = torch.load(conv / "params" / f"{_canonical(name)}.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            p.data.copy_(st["fp32"].to(p.device, p.dtype))
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2, bf16: the flat fp32 partition and moments this rank holds
            safe_set_full_fp32_param(p, st["fp32"].to(p.device))
            for k in _STATES[1:]:
                safe_set_full_optimizer_state(p, st[k].to(p.device), k)
        else:
            plain = ds.optimizer
            plain.state[p] = {"step": step.clone(), **{k: st[k].to(p.device).clone() for k in _STATES[1:]}}
    if plain is None:  # ZeRO 1/2: one step count per flat group
        inner = ds.optimizer.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p]["step"] = step.clone()
        scaler = info.get("loss_scaler")
        if scaler and hasattr(ds.optimizer, "loss_scaler"):
            for k, v in scaler.items():
                setattr(ds.optimizer.loss_scaler, k, type(getattr(ds.optimizer.loss_scaler, k))(v))
    restore_schedule(ds, info.get("lr_scheduler"))
    ds.global_steps, ds.global_samples = int(info["global_steps"]), int(info["global_samples"])
    ds.skipped_steps = int(info.get("skipped_steps") or 0)


def restore_schedule(ds, state: dict | None) -> None:
    """The lr scheduler's state, and the lr it implies in the optimizer's param groups. ``LambdaLR.load_state_dict``
    restores the step count but leaves the groups at the freshly built scheduler's lr (that of step 0): the first
    update after a conversion would run at it. DeepSpeed's own load restores the groups with the optimizer."""
    if state is None:
        return
    sched = ds.lr_scheduler
    sched.load_state_dict(state)
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
        group["lr"] = lr


def load_resharded(manager, root: Path, tag: str) -> dict:
    """COLLECTIVE: resume ``manager``'s engine from a checkpoint of another layout. Rank 0 converts (once),
    every rank loads its parameters; returns what CheckpointManager.load returns."""
    tag_dir = root / tag
    eng = manager.eng
    meta = read_meta(tag_dir)
    reused = True
    if eng.rt.rank == 0:
        t0 = time.perf_counter()
        _, built = convert(tag_dir)
        reused = not built
        took = time.perf_counter() - t0
    eng.barrier()
    conv = converted(tag_dir)
    if conv is None:
        raise CheckpointError(f"converting checkpoint {str(tag_dir)!r} to this layout failed: see rank 0's output")
    info = json.loads((conv / "elastic.json").read_text())
    _load_into_engine(eng, conv, info)
    if eng.rt.rank == 0:
        how = f"reused {conv}" if reused else f"converted once in {took:.1f} s, kept in {conv}"
        print(f"layout changed since step {meta['step']}: {describe(meta['topology'])} -> "
              f"{describe(eng.topology())}; {how}", flush=True)
    # what the ranks of the old layout kept for themselves: the data position is the same on every rank (the
    # order does not depend on the layout), meters count the whole run; RNG streams start anew per rank
    state = torch.load(rank_file(tag_dir, 0), weights_only=False)
    state.pop("rng")
    _reseed(manager.cfg.train.seed, meta["step"], eng.rt.rank)
    eng.barrier()
    return {"step": meta["step"], "run_id": meta.get("run_id"), "meta": meta, **state}


def _reseed(seed: int, step: int, rank: int) -> None:
    import random

    import numpy as np

    s = (seed * 1_000_003 + step * 7919 + rank) & 0x7FFFFFFF
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)

