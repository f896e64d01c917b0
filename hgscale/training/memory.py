"""Per-rank peak memory of a training step, predicted from the config and the layout alone (no process group),
and the layouts of G GPUs that fit, fastest first.

    pred = predict_memory(cfg, world_size=8)                    # bytes: total, parameters, gradients, ...
    rows = fitting_layouts(cfg, gpus=64, gpu_mem_bytes=80e9)    # every DP x PP x SP x ZeRO x micro x policy that fits
    hgscale plan --config C --memory [--world N] | --gpus 64 --gpu-mem 80GB

Activations: what each layer keeps for backward, counted tensor by tensor from the model's code (pre-LN block:
input, LN outputs, the attention kernel's operands, the two feed-forward hidden tensors, dropout masks). The
attention kernel is the config's (model.attn_impl; 'auto': blocked on CPU, fused on CUDA): the blocked kernel
keeps the probabilities of its first query blocks up to ``blocked_attention.KEEP_BYTES`` per call, the fused one
the widened operands Q', K' (d_head + D per head). A checkpointed layer (``parallel.activation_checkpointing``,
by level: a down layer counts to the level before it, an up layer to the level after it) keeps its input only,
and recomputes its activations in its backward. Sequence parallelism N divides every level's tokens by N;
attention runs over all tokens for H/N heads.

Peak: the backward pass is walked from the last layer of a stage to its first. Before layer i's backward the
rank holds the kept activations of the layers below i, layer i's full activations (recomputed if checkpointed),
its backward working set (``transient``) and the gradients produced so far; a pipeline stage s also holds
min(stages - s, accumulation) - 1 other micro-batches' activations (1F1B), and as DeepSpeed back-propagates the
output tuple of a stage one tensor at a time with retain_graph, a stage that sends more than x (uv, open skips)
frees nothing of a micro-batch before its backward ends. The optimizer step is a second
candidate: model states, all gradients and one fp32 temporary of Adam. Model states follow DeepSpeed:
ZeRO-0 replicates fp32 Adam (2 states) and gradients; ZeRO-1 partitions the optimizer states and an fp32 master
copy over dp x sp ranks; ZeRO-2 also partitions gradients; bf16/fp16 keep fp32 master weights (ZeRO-0: whole).
Buffers: ZeRO-1/2's gradient bucket (zero_optimization.reduce_bucket_size elements: the model's parameter count,
at most 5e8, as ds_config sets it), the attention's cached distance tables, a stage's receive buffers. Not: the
CUDA context and allocator fragmentation (leave headroom). Validated on CPU: benchmarks/memory_plan.py.

Step time (ranking only): per-rank training FLOPs (hgscale.models.flops) of the slowest pipeline stage, plus a
third of the checkpointed layers' (their recomputed forward), at SUSTAINED_FLOPS, times the pipeline bubble
(accum + stages - 1) / accum, plus the sequence-parallel all-to-alls of q, k, v and the output of every
attention (forward, backward, recompute) at ALL_TO_ALL_BYTES_S. Data-parallel reductions overlap the backward
and are not counted.
"""
from __future__ import annotations

import math

from hgscale.config import Config
from hgscale.models import blocked_attention, layer_flops, layer_params, layer_plan
from hgscale.models.attention import BLOCK
from hgscale.models.hourglass import layer_levels
from hgscale.training.layout import ParallelLayout
from hgscale.training.pipeline import layer_names, stage_parts
from hgscale.training.recompute import recomputed_layers

SUSTAINED_FLOPS = 400e12    # per GPU, dense bf16 at a realistic utilisation (H100: ~40 % of 989 TFLOP/s)
ALL_TO_ALL_BYTES_S = 100e9  # per rank, NVLink-class all-to-all bandwidth
ADAM_STATES = 2
POLICIES = ("none", "full_resolution", "all")


def _elt(cfg: Config) -> int:
    """Bytes of an activation, gradient or weight element: DeepSpeed runs bf16/fp16 models in that dtype."""
    return 4 if cfg.train.precision == "fp32" else 2


def checkpointed(cfg: Config, policy=None) -> list[bool]:
    """Which layers recompute their activations under ``policy`` (default: parallel.activation_checkpointing)."""
    which = recomputed_layers(cfg, policy)
    return [i in which for i in range(len(layer_plan(cfg.model)))]


def _kept_probs(rows: int, n: int, qs: int, per_el: int, budget: float) -> float:
    """Bytes of probabilities the blocked kernel keeps for one call: ``rows`` = batch x heads, n queries every qs
    keys; query block k (of b = min(BLOCK, n) rows) sees qs*b*(k+1) keys; a prefix of blocks within ``budget``."""
    b = min(BLOCK, n)
    full, c = n // b, rows * b * qs * b * per_el  # block k costs c*(k+1)
    k = min(full, int((math.sqrt(1 + 8 * budget / c) - 1) / 2)) if c else 0
    kept = c * k * (k + 1) / 2
    last = rows * (n - full * b) * qs * n * per_el  # a shorter last block sees all keys
    return kept + last if k == full and last and kept + last <= budget else kept


def _attention(cfg: Config, B: int, nq: int, nk: int, qs: int, calls: int, sp: int, device: str,
               elt: int) -> tuple[float, float, float]:
    """(kept, table, backward working set) bytes of the attention of one layer: nq queries over nk keys (the full
    length: H/sp heads on this rank), in ``calls`` kernel calls (upsampling: one per residue). Kept: qu, qv, the
    output and its copy or the q slice of the fused projection (4 query-side tensors t), k and v (2 key-side
    tensors), and what the kernel itself keeps; the layer counts its inputs and LayerNorm outputs."""
    m = cfg.model
    H, D = m.n_heads // sp, m.d_model // sp  # heads and width of this rank inside attention
    t, tk = B * nq * D * elt, B * nk * D * elt  # (B, H/sp, n, d_head)
    a2a = 4 * t if sp > 1 else 0  # q, k, v and the output gathered to the full length (Ulysses)
    impl = m.attn_impl if m.attn_impl != "auto" else ("blocked" if device == "cpu" else "fused")
    if m.attention == "rotary":
        return 3 * t + 3 * tk, 0.0, 3 * t + 2 * tk + a2a  # q, k rotated; v in the fused projection
    if impl == "blocked":
        per_call, b = nq // calls, min(BLOCK, nq // calls)
        rows = qs * (per_call + b - 1)  # the projected distance table of one call, expanded over the batch
        R = calls * B * rows * D * elt
        budget = blocked_attention.KEEP_BYTES / calls / sp  # a call's budget, shared by the ranks holding its heads
        probs = calls * _kept_probs(B * H, per_call, qs, elt + (m.attn_dropout > 0), budget)
        ws = B * H * b * rows * elt  # one workspace of the largest block; the backward uses three
        kv = 2 * tk * (calls if B > 1 else 1)  # per call, k and v are copies unless B = 1 (strided views)
        return 4 * t + kv + R + probs, calls * rows * m.d_model * elt, 3 * t + 2 * tk + R + 3 * ws + a2a
    if impl == "fused":
        wide = (1 + m.n_heads) * (t + tk)  # Q' = [q + u | phi], K' = [k | psi]: d_head + D per head
        return 4 * t + 2 * tk + wide, 8 * (nq + nk) * m.d_model, wide + 2 * tk + m.n_heads * t + a2a
    scores = B * H * nq * nk * elt  # naive / sdpa: the (nq, nk) position term, scores and probabilities
    return 4 * t + 2 * tk + 3 * scores, 0.0, 3 * t + 2 * tk + 2 * scores + a2a


def _ff(cfg: Config, B: int, n: int, elt: int, mask: int) -> tuple[float, float]:
    """(kept, backward working set) of LN -> FF -> residual over n tokens: the residual input and LN output
    (B, n, D), GELU input and output (B, n, d_ff), dropout masks of the hidden and the residual branch."""
    t, h = B * n * cfg.model.d_model, B * n * cfg.model.d_ff
    drop = (t + h) * mask if cfg.model.dropout > 0 else 0
    return (2 * t + 2 * h) * elt + drop, (2 * h + 2 * t) * elt


def _resampling(cfg: Config, kind: str, B: int, n: int, mm: int, f: int, sp: int, device: str,
                elt: int, mask: int) -> tuple[float, float, float]:
    """(kept, table, working set) of a down layer (n -> mm tokens) or an up layer (mm -> n) of factor f."""
    D = cfg.model.d_model
    tn, tm = B * n // sp * D * elt, B * mm // sp * D * elt  # (B, n/sp, D), (B, mm/sp, D) on this rank
    method = cfg.model.downsample if kind == "down" else cfg.model.upsample
    if not method.startswith("attention_"):
        if kind == "down":  # LN input; the linear pool also keeps the shifted input (and a dropout mask)
            return (tn if method == "avg" else 2 * tn + tm * mask / elt * (cfg.model.dropout > 0)), 0.0, 2 * tn
        extra = (tm + tn * mask / elt * (cfg.model.dropout > 0)) if method == "linear" else 0
        return tm + tn + extra, 0.0, 2 * tn  # LN input, the upsampled tensor for ln_out
    if kind == "down":  # pooled queries (mm) every f shifted keys (n)
        ak, table, aw = _attention(cfg, B, mm, n, f, 1, sp, device, elt)
        ffk, ffw = _ff(cfg, B, mm // sp, elt, mask)
        rest = 3 * tn + 2 * tm  # LN input, shifted input, its LN; the pooled tensor and ln_q of it
        drop = tm * mask / elt * (cfg.model.dropout > 0)
    else:  # full-resolution queries (n) over the shortened keys (mm), one kernel call per residue
        ak, table, aw = _attention(cfg, B, n, mm, 1, f, sp, device, elt)
        ffk, ffw = _ff(cfg, B, n // sp, elt, mask)
        rest = 2 * tm + 3 * tn  # LN input and output of y; upsampled, queries with the skip; output for ln_out
        drop = tn * mask / elt * (cfg.model.dropout > 0)
    return rest + ak + ffk + drop, table, max(ffw, aw - ffk)


def _layer(cfg: Config, item: tuple, B: int, T: int, sp: int, device: str) -> tuple[float, float, float, float]:
    """(activations kept for backward, backward working set, attention table, input) bytes of one layer for one
    micro-batch of B sequences padded to T tokens, on one of ``sp`` ranks sharing them."""
    m, elt = cfg.model, _elt(cfg)
    mask = elt if device == "cpu" else 1  # dropout masks: float of x's dtype on CPU, bool on GPU
    kind, *args = item
    D, tl = m.d_model, B * T // sp * m.d_model * elt  # (B, T/sp, D): full-resolution stream on this rank
    drop = mask / elt * (m.dropout > 0)
    if kind == "embed":
        return B * T // sp * 8 + tl * drop, 0.0, 0.0, 0.0  # token ids for the embedding's backward
    if kind == "head":  # LN input and output; fp32 log-probabilities (and their gradient, the logits')
        logp = B * T // sp * m.vocab_size * 4
        return 2 * tl + logp + B * T // sp * 8, 2 * logp + logp * elt / 4, 0.0, tl
    if kind == "block":
        n = T // args[0]
        t = B * n // sp * D * elt
        if args[0] == 1 and m.vanilla_attention == "lsh":  # chunked scores of n_hashes sorted copies
            L = n + (-n % m.lsh_chunk_len)
            ak = 6 * t + B * m.n_heads * m.lsh_n_hashes * L * (1 + m.lsh_chunks_before) * m.lsh_chunk_len * elt
            table, aw = 0.0, ak
        else:
            ak, table, aw = _attention(cfg, B, n, n, 1, 1, sp, device, elt)
        ffk, ffw = _ff(cfg, B, n // sp, elt, mask)
        act = 2 * t + ak + t * drop + ffk  # input, ln1 output, attention, its dropout mask, feed-forward
        return act, max(ffw, aw - ffk), table, t
    outer, inner = (args[0], args[1]) if kind == "down" else (args[1], args[0])
    n, mm = T // outer, T // inner
    act, table, work = _resampling(cfg, kind, B, n, mm, inner // outer, sp, device, elt, mask)
    return act, work, table, B * (n if kind == "down" else mm) // sp * D * elt


def padded_len(cfg: Config, sp: int = 1) -> int:
    """data.seq_len padded as the embedding pads it: to a multiple of sp x the total shortening factor."""
    k = cfg.model.total_factor() * sp
    return cfg.data.seq_len + (-cfg.data.seq_len % k)


def layer_memory(cfg: Config, micro: int | None = None, sp: int | None = None, policy=None,
                 device: str = "cuda") -> list[dict]:
    """Per layer, for one micro-batch on one rank: ``kept`` (bytes held from its forward to its backward: its
    input when checkpointed, else its activations), ``act`` (its activations, recomputed if checkpointed),
    ``work`` (its backward working set), ``table`` (cached attention tables), ``ckpt``, ``level``."""
    B, sp = micro or cfg.train.micro_batch_size, sp or cfg.parallel.sequence_parallel
    T, ck, levels = padded_len(cfg, sp), checkpointed(cfg, policy), layer_levels(cfg.model)
    out, downs = [], []
    for i, item in enumerate(layer_plan(cfg.model)):
        act, work, table, inp = _layer(cfg, item, B, T, sp, device)
        out.append({"act": act, "work": work, "table": table, "ckpt": ck[i], "level": levels[i],
                    "kept": inp if ck[i] else act})
        if item[0] == "down":
            downs.append(i)
        elif item[0] == "up":  # the skip rides in the input of every layer of the valley; a checkpointed one
            d = downs.pop()    # keeps it until its backward: count it once, at the first such layer
            first = next((j for j in range(d + 1, i + 1) if ck[j]), None)
            if first is not None:
                out[first]["kept"] += B * (T // item[2]) // sp * cfg.model.d_model * _elt(cfg)
    return out


def layer_activation_bytes(cfg: Config, micro: int | None = None, sp: int | None = None, policy=None,
                           device: str = "cuda") -> list[float]:
    """Bytes each layer keeps for its backward, per micro-batch and rank (defaults: the config's micro-batch,
    sequence parallelism and checkpointing policy; the GPU kernels)."""
    return [float(r["kept"]) for r in layer_memory(cfg, micro, sp, policy, device)]


def _states(cfg: Config, lay: ParallelLayout, params: int) -> dict:
    """Model-state bytes of a rank holding ``params`` parameters: weights, gradients (all of them, as after the
    backward), fp32 master weights and Adam states, DeepSpeed's gradient bucket; ZeRO partitions over dp x sp."""
    elt, z, parts, bucket = _elt(cfg), lay.zero_stage, lay.dp * lay.sp, 0.0
    share = params / parts if z >= 1 else params
    zo = cfg.deepspeed.get("zero_optimization", {}) if isinstance(cfg.deepspeed, dict) else {}
    if z in (1, 2) and zo.get("contiguous_gradients", True):
        # reduce_bucket_size elements (fp32 for bf16 pipelines), twice with overlap_comm; hgscale's DeepSpeed JSON
        # sets it to the model's parameter count (at most DeepSpeed's 5e8) unless the deepspeed section does
        size = zo.get("reduce_bucket_size", min(5e8, sum(layer_params(cfg.model))))
        bucket = float(size) * (4 if elt == 4 or lay.stages > 1 else elt) * (2 if zo.get("overlap_comm") else 1)
    master = 4 * share if (z >= 1 or elt != 4) else 0.0  # ZeRO keeps an fp32 copy of its partition even in fp32
    return {"parameters": elt * (params / parts if z == 3 else params),
            "gradients": elt * (params / parts if z >= 2 else params),
            "optimizer": master + 4 * ADAM_STATES * share,
            "step_temp": 4 * share * (2 if z >= 1 else 1),  # Adam's fp32 temporary (+ the flat partition gradient)
            "bucket": bucket, "grad_elt": elt, "grad_parts": parts if z >= 2 else 1}


def _walk(rows: list[dict], params: list[int], states: dict, in_flight: int, later_micro: bool,
          retained: bool = False) -> dict:
    """The peak of one stage's step: the backward walked from its last layer to its first, then the optimizer
    step. ``rows``/``params``: the stage's layers; ``later_micro``: gradients of earlier micro-batches exist;
    ``retained``: the backward frees nothing of the micro-batch until it ends (retain_graph)."""
    full_grads, best = states["gradients"], {"total": -1.0}
    kept = below = sum(r["kept"] for r in rows)
    other = (in_flight - 1) * kept  # micro-batches in flight behind this one (1F1B)
    for i in range(len(rows) - 1, -1, -1):
        below = kept - rows[i]["kept"] if retained else below - rows[i]["kept"]
        grads = full_grads if later_micro else states["grad_elt"] * sum(params[i:]) / states["grad_parts"]
        parts = {"parameters": states["parameters"], "gradients": grads, "optimizer": states["optimizer"],
                 "activations": other + below + rows[i]["act"], "transient": rows[i]["work"]}
        total = sum(parts.values())
        if total > best["total"]:
            best = {"total": total, "phase": "backward", "layer": i, **parts}
    step = {"parameters": states["parameters"], "gradients": full_grads, "optimizer": states["optimizer"],
            "activations": 0.0, "transient": states["step_temp"]}
    if sum(step.values()) > best["total"]:
        best = {"total": sum(step.values()), "phase": "optimizer step", "layer": None, **step}
    return best


def _boundary(cfg: Config, B: int, sp: int, index: int, count: bool = False) -> float:
    """Bytes of the state tuple leaving layer ``index`` (x and the open skips), as a pipeline sends it; with
    ``count``, the number of floating tensors in it (uv too)."""
    T, D, elt = padded_len(cfg, sp), cfg.model.d_model, _elt(cfg)
    total, skips = 0, []
    for kind, *args in layer_plan(cfg.model)[: index + 1]:
        if kind == "down":
            skips.append(T // args[0])
        elif kind == "up":
            skips.pop()
        total = T // (args[1] if kind in ("down", "up") else (args[0] if kind == "block" else 1)) + sum(skips)
    if count:
        return 1 + len(skips) + (cfg.model.attention == "relative")
    return B * total // sp * D * elt


def _stage(cfg: Config, lay: ParallelLayout, rows: list[dict], parts: list[int], s: int) -> dict:
    """The peak of pipeline stage ``s`` (the whole model when stages = 1) with its breakdown."""
    a, b = parts[s], parts[s + 1]
    params = layer_params(cfg.model)[a:b]
    states = _states(cfg, lay, sum(params))
    in_flight = min(lay.stages - s, lay.accum) if lay.stages > 1 else 1
    out = _boundary(cfg, lay.micro, lay.sp, b - 1) if s < lay.stages - 1 else 0.0
    mine = [dict(r) for r in rows[a:b]]
    if mine and out:  # DeepSpeed keeps each in-flight micro-batch's stage output until its backward
        mine[-1]["kept"] += out
        mine[-1]["act"] += out
    # DeepSpeed back-propagates a stage's outputs one tensor at a time, retaining the graph for all but the last
    retained = s < lay.stages - 1 and _boundary(cfg, lay.micro, lay.sp, b - 1, count=True) > 1
    plan, open_downs = layer_plan(cfg.model), []
    for j in range(a, b):
        open_downs = open_downs + [j] if plan[j][0] == "down" else open_downs[:-1] if plan[j][0] == "up" else open_downs
    for d in open_downs if retained else []:  # an outgoing skip's own pass recomputes its checkpointed down layer
        extra = rows[d]["act"] - rows[d]["kept"] if rows[d]["ckpt"] else 0.0  # for one LayerNorm: the rest of it
        for r in mine[: d - a]:  # stays until that pass ends, while the layers below it run their backward
            r["act"] += extra
    peak = _walk(mine, params, states, in_flight, later_micro=lay.accum > 1, retained=retained)
    tables = sum({plan[i]: rows[i]["table"] for i in range(a, b)}.values())  # one per geometry, cached
    recv = (_boundary(cfg, lay.micro, lay.sp, a - 1) if s > 0 else 0.0) + out  # activation / gradient receive
    peak["buffers"] = states["bucket"] + tables + recv
    peak["total"] += peak["buffers"]
    peak.update(stage=s, layers=[a, b], in_flight=in_flight, kept_per_micro_batch=sum(r["kept"] for r in mine),
                layer=None if peak["layer"] is None else peak["layer"] + a)
    levels: dict = {}
    for i in range(a, b):
        key = str(rows[i]["level"]) if rows[i]["level"] is not None else "embed/head"
        levels[key] = levels.get(key, 0.0) + rows[i]["kept"] * in_flight
    peak["activations_by_level"] = levels
    return peak


def _parts(cfg: Config, stages: int) -> list[int]:
    return [0, len(layer_plan(cfg.model))] if stages == 1 else stage_parts(cfg, stages)


def predict_layout(cfg: Config, lay: ParallelLayout, policy=None, device: str = "cuda",
                   parts: list[int] | None = None, rows: list[dict] | None = None) -> dict:
    """The per-rank peak of ``cfg`` on layout ``lay`` (its worst stage), broken down at the moment it happens:
    parameters + gradients + optimizer + activations + buffers + transient = total (bytes). ``parts`` and
    ``rows`` (layer_memory's) may be passed in when many layouts share them."""
    policy = cfg.parallel.activation_checkpointing if policy is None else policy
    rows = rows or layer_memory(cfg, lay.micro, lay.sp, policy, device)
    parts = parts or _parts(cfg, lay.stages)
    stages = [_stage(cfg, lay, rows, parts, s) for s in range(lay.stages)]
    worst = max(stages, key=lambda st: st["total"])
    where = (f"backward of layer {worst['layer']} ({layer_names(cfg)[worst['layer']]})" if worst["layer"] is not None
             else "optimizer step")
    policy_name = {True: "all", False: "none"}.get(policy, policy) if not isinstance(policy, list) else policy
    return {"layout": {**lay.as_dict(), "activation_checkpointing": policy_name}, "device": device,
            "seq_len": cfg.data.seq_len, "padded_len": padded_len(cfg, lay.sp), "peak_at": where,
            **{k: worst[k] for k in ("total", "parameters", "gradients", "optimizer", "activations", "buffers",
                                      "transient", "stage", "layers", "in_flight", "activations_by_level")},
            "stages": [{k: st[k] for k in ("stage", "total", "in_flight", "kept_per_micro_batch")} for st in stages]}


def predict_memory(cfg: Config, world_size: int, device: str = "cuda") -> dict:
    """The per-rank peak bytes of a training step of ``cfg`` on ``world_size`` processes, as configured
    (parallel.*, train.micro_batch_size, the checkpointing policy); raises ConfigError if the layout does not fit."""
    return predict_layout(cfg, ParallelLayout.of(cfg, world_size), device=device)


def step_time(cfg: Config, lay: ParallelLayout, policy=None, parts: list[int] | None = None) -> float:
    """Predicted seconds of one optimizer step (the ranking model of the module docstring)."""
    flops, ck = layer_flops(cfg.model, cfg.data.seq_len, lay.micro), checkpointed(cfg, policy)
    parts = parts or _parts(cfg, lay.stages)
    # training FLOPs per token of each stage; a checkpointed layer runs its forward (a third) once more
    per_stage = [sum(flops[i] * (1 + ck[i] / 3) for i in range(a, b)) for a, b in zip(parts, parts[1:], strict=False)]
    tokens = lay.micro * cfg.data.seq_len / lay.sp  # per micro-batch and rank
    compute = max(per_stage) * tokens * lay.accum / SUSTAINED_FLOPS * (lay.accum + lay.stages - 1) / lay.accum
    if lay.sp == 1:
        return compute
    m, T, elt, moved = cfg.model, padded_len(cfg, lay.sp), _elt(cfg), 0.0
    for i, (kind, *args) in enumerate(layer_plan(m)):
        attends = kind == "block" or (kind in ("down", "up") and
                                      (m.downsample if kind == "down" else m.upsample).startswith("attention_"))
        if attends:  # q, k, v and the output, (sp-1)/sp of each rank's share leaves it; fwd, bwd (+ recompute)
            n = T // min(args)
            moved += 4 * lay.micro * n * m.d_model * elt / lay.sp * (lay.sp - 1) / lay.sp * (2 + ck[i])
    return compute + moved * lay.accum / ALL_TO_ALL_BYTES_S


def _candidates(cfg: Config, gpus: int, batch: int):
    """(stages, sp, dp, micro, accum) of every layout of ``gpus`` ranks that the config can take."""
    m = cfg.model
    n_layers = len(layer_plan(m))
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    for stages in divisors(gpus):
        if stages > n_layers:
            continue
        for sp in divisors(gpus // stages):
            if sp > 1 and (stages > 1 or m.n_heads % sp or m.vanilla_attention == "lsh"):
                continue
            dp = gpus // (stages * sp)
            if batch % dp:
                continue
            for micro in divisors(batch // dp):
                yield stages, sp, dp, micro, batch // (dp * micro)


def _policies(cfg: Config) -> list[str]:
    """The policies of POLICIES that checkpoint different layers (full_resolution = all for a flat model)."""
    seen, out = set(), []
    for p in POLICIES:
        key = tuple(checkpointed(cfg, p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def fitting_layouts(cfg: Config, gpus: int, gpu_mem_bytes: float, device: str = "cuda") -> list[dict]:
    """Every layout of ``gpus`` ranks (pipeline stages x sequence parallel x data parallel x ZeRO 0-2 x micro-batch
    x checkpointing policy) whose predicted peak fits ``gpu_mem_bytes``, fastest predicted step first. The global
    batch is train.global_batch_size, else micro_batch_size x grad_accum_steps x the data-parallel size the
    config's own stages and sequence parallelism leave of ``gpus``."""
    if gpus < 1:
        raise ValueError(f"gpus = {gpus} must be >= 1")
    t, p = cfg.train, cfg.parallel
    batch = t.global_batch_size or t.micro_batch_size * max(t.grad_accum_steps, 1) * max(
        gpus // (p.pipeline_stages * p.sequence_parallel), 1)
    out, rows_cache, parts_cache = [], {}, {}
    for stages, sp, dp, micro, accum in _candidates(cfg, gpus, batch):
        parts = parts_cache.setdefault(stages, _parts(cfg, stages))
        for policy in _policies(cfg):
            if (micro, sp, policy) not in rows_cache:
                rows_cache[micro, sp, policy] = layer_memory(cfg, micro, sp, policy, device)
            rows = rows_cache[micro, sp, policy]
            for zero in (0, 1, 2) if stages == 1 else (0, 1):
                lay = ParallelLayout(gpus, stages, micro, accum, zero, sp)
                pred = predict_layout(cfg, lay, policy, device, parts, rows)
                if pred["total"] <= gpu_mem_bytes:
                    out.append({"pp": stages, "sp": sp, "dp": dp, "zero": zero, "micro": micro, "accum": accum,
                                "policy": policy, "total": pred["total"], "peak_at": pred["peak_at"],
                                "step_s": step_time(cfg, lay, policy, parts)})
    return sorted(out, key=lambda r: (r["step_s"], r["total"]))
