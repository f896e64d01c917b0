"""Load a checkpoint into the trainer's engine of THIS layout and write the full training state each rank holds.

    deepspeed --num_gpus 2 tests/integration/elastic_probe.py --config C.json --out DIR [key=value ...]

checkpoint.resume of the config names the checkpoint; the same layout loads through DeepSpeed, another
through hgscale.checkpoint.reshard. DIR/state_rank{r}.pt: {HourglassLM name: {"fp32", "exp_avg", "exp_avg_sq"}} of
this rank's parameters (full tensors, gathered from ZeRO partitions) and "adam_step", "global_steps".
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from hgscale.checkpoint.manager import CheckpointManager, resume_point  # noqa: E402
from hgscale.config import load_config  # noqa: E402
from hgscale.training.ds_config import deepspeed_config  # noqa: E402
from hgscale.training.engine import TrainEngine, init_distributed, world_from_env  # noqa: E402


def full_state(eng) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from hgscale.checkpoint.reshard import _flat_partitions, link_zero_optimizer_state

    out, step = {}, None
    opt = eng.engine.optimizer
    if _flat_partitions(opt) is not None:  # ZeRO 1/2 link Adam's state lazily
        link_zero_optimizer_state(opt)
    for name, p in eng.engine.module.named_parameters():
        canon = f"layers.{name}" if eng.pipeline else name.removeprefix("model.")
        if hasattr(p, "_hp_mapping"):
            out[canon] = {"fp32": safe_get_full_fp32_param(p).clone(),
                          **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
        else:
            st = opt.state[p]
            out[canon] = {"fp32": p.detach().clone(), "exp_avg": st["exp_avg"].clone(),
                          "exp_avg_sq": st["exp_avg_sq"].clone()}
            step = float(st["step"])
    if step is None:
        inner = opt.optimizer
        step = float(next(iter(inner.state.values()))["step"])
    return {"params": out, "adam_step": step, "global_steps": eng.engine.global_steps,
            "lr": [g["lr"] for g in opt.param_groups]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = world_from_env()
    cfg = load_config(args.config, args.overrides)
    ds_json = deepspeed_config(cfg, world)
    rt = init_distributed(cfg)
    eng = TrainEngine(cfg, ds_json, rt)
    CheckpointManager(cfg, eng, ds_json).load(*resume_point(cfg))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(full_state(eng), out / f"state_rank{rt.rank}.pt")
    eng.barrier()


if __name__ == "__main__":
    main()
