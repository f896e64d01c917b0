"""Print the pipeline stage plan without starting anything.

    python -m hgscale plan --config configs/enwik8_xl.json --stages 4 [--json] [key=value ...]

Per stage: layers, training FLOPs share, parameters and an activation-memory estimate, for the split
balanced by per-layer FLOPs (ours) beside DeepSpeed's ``parameters`` split; imbalance = max/mean stage FLOPs.
"""
from __future__ import annotations

from hgscale.config import Config, ConfigError


def _stages(parts: list[int], names: list[str], costs: list[float], params: list[int], act: list[float],
            in_flight: list[int]) -> tuple[list[dict], float]:
    total = sum(costs)
    out = []
    for s in range(len(parts) - 1):
        a, b = parts[s], parts[s + 1]
        out.append({"stage": s, "layers": [a, b], "first": names[a] if b > a else None,
                    "last": names[b - 1] if b > a else None, "n_layers": b - a,
                    "flops": sum(costs[a:b]), "flops_share": sum(costs[a:b]) / total if total else 0.0,
                    "params": sum(params[a:b]),
                    "activation_gib": sum(act[a:b]) * in_flight[s] / 2**30})
    flops = [st["flops"] for st in out]
    mean = sum(flops) / len(flops)
    return out, (max(flops) / mean if mean else float("inf"))


def stage_plan(cfg: Config, stages: int) -> dict:
    """The FLOPs-balanced split and DeepSpeed's parameter split of ``cfg`` over ``stages`` stages."""
    from hgscale.models import flops_per_token
    from hgscale.training.memory import layer_activation_bytes
    from hgscale.training.pipeline import layer_costs, layer_names, layer_param_counts, partition

    names, costs = layer_names(cfg), layer_costs(cfg)
    params = layer_param_counts(cfg)
    act = layer_activation_bytes(cfg)
    if stages > len(names):
        raise ConfigError([f"--stages {stages} exceeds the {len(names)} pipeline layers of model.hierarchy "
                           f"{cfg.model.hierarchy!r}"])
    # 1F1B: stage s holds up to (stages - s) micro-batches' activations, at most the accumulation count
    in_flight = [min(stages - s, cfg.train.grad_accum_steps) for s in range(stages)]
    flops_parts = partition(costs, stages)
    param_parts = partition([float(p) for p in params], stages)
    ours, imb = _stages(flops_parts, names, costs, params, act, in_flight)
    theirs, imb_p = _stages(param_parts, names, costs, params, act, in_flight)
    return {"config_hierarchy": cfg.model.hierarchy, "seq_len": cfg.data.seq_len,
            "micro_batch_size": cfg.train.micro_batch_size, "stages": stages, "n_layers": len(names),
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
            "flops": {"parts": flops_parts, "imbalance": imb, "stages": ours},
            "parameters": {"parts": param_parts, "imbalance": imb_p, "stages": theirs},
            "layers": [{"index": i, "name": n, "flops": c, "params": p}
                       for i, (n, c, p) in enumerate(zip(names, costs, params, strict=True))]}


def format_plan(plan: dict) -> str:
    lines = [f"hierarchy {plan['config_hierarchy']!r}, seq_len {plan['seq_len']}, micro-batch "
             f"{plan['micro_batch_size']}: {plan['n_layers']} pipeline layers over {plan['stages']} stages",
             f"{'':6s}{'split by FLOPs (hgscale)':^52s} | {'split by parameters (DeepSpeed)':^40s}",
             f"{'stage':6s}{'layers':>9s} {'first..last':24s}{'FLOPs':>7s}{'params':>8s}{'act GiB':>8s} |"
             f"{'layers':>9s}{'FLOPs':>8s}{'params':>9s}{'act GiB':>9s}"]
    for a, b in zip(plan["flops"]["stages"], plan["parameters"]["stages"], strict=True):
        span = f"{a['first']}..{a['last']}" if a["n_layers"] else "-"
        ra, rb = "[{},{})".format(*a["layers"]), "[{},{})".format(*b["layers"])
        lines.append(f"{a['stage']:<6d}{ra:>9s} {span:24s}{a['flops_share']:>6.1%}{a['params'] / 1e6:>7.2f}M"
                     f"{a['activation_gib']:>8.2f} |{rb:>9s}{b['flops_share']:>8.1%}{b['params'] / 1e6:>8.2f}M"
                     f"{b['activation_gib']:>9.2f}")
    lines.append(f"imbalance (max/mean stage FLOPs): {plan['flops']['imbalance']:.3f} by FLOPs, "
                 f"{plan['parameters']['imbalance']:.3f} by parameters")
    return "\n".join(lines)
