"""One training job for the parity tests, through the trainer's own engine (hgscale.training.engine).

    deepspeed --num_gpus 2 tests/integration/ds_worker.py --config C.json --out DIR --steps 2 --data synthetic
    python tests/integration/ds_worker.py ...                 # one process

Writes DIR/rank{r}.json (losses, hashes of every micro-batch this rank read, stage, data-parallel rank),
DIR/params_rank{r}.pt (this rank's parameters named as in HourglassLM, full even under ZeRO-3) and, with
--checkpoint, a checkpoint plus DIR/logits.pt: the trained engine's logits of a fixed batch.

--data synthetic: step s draws a global batch of G = micro x accum x dp rows from seed s; data-parallel
rank r's micro-batch m is row block m*dp + r. A single process with accum x dp micro-batches therefore
averages gradients over exactly the same rows as the data-parallel job.
--data stream: the real dataset stream of the rank's data-parallel rank (data.url).
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from hgscale.config import load_config  # noqa: E402
from hgscale.training.ds_config import deepspeed_config  # noqa: E402
from hgscale.training.engine import TrainEngine, init_distributed, world_from_env  # noqa: E402


def synthetic(cfg, eng, steps):
    B, T, A = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.grad_accum_steps
    for s in range(steps):
        g = torch.Generator().manual_seed(1000 + s)
        rows = torch.randint(0, cfg.model.vocab_size, (B * A * eng.dp_size, T + 1), generator=g)
        for m in range(A):
            blk = rows[(m * eng.dp_size + eng.dp_rank) * B:(m * eng.dp_size + eng.dp_rank + 1) * B]
            yield blk[:, :-1].contiguous(), blk[:, 1:].contiguous()


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


def named_params(eng) -> dict:
    module = eng.engine.module
    params = dict(module.named_parameters())
    if eng.cfg.parallel.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k.removeprefix("model."): v.detach().clone() for k, v in params.items()}
    if eng.pipeline:
        return {f"layers.{k}": v.detach().clone() for k, v in params.items()}
    return {k.removeprefix("model."): v.detach().clone() for k, v in params.items()}


def compiled_layers(eng) -> int:
    """This rank's layers still running their compiled forward (train.compile; 0 without it)."""
    from hgscale.training.compile import still_compiled

    module = eng.engine.module
    return still_compiled(module.forward_funcs if eng.pipeline else module.model.layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", choices=("synthetic", "stream"), default="synthetic")
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = world_from_env()
    cfg = load_config(args.config, args.overrides)
    ds_json = deepspeed_config(cfg, world)
    rt = init_distributed(cfg)
    eng = TrainEngine(cfg, ds_json, rt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    it = None
    if eng.reads_data:
        if args.data == "synthetic":
            it = synthetic(cfg, eng, args.steps)
        else:
            from hgscale.data import open_dataset
            ds = open_dataset(cfg.data)
            it = iter(ds.stream(cfg.data.train_split, cfg.train.micro_batch_size, cfg.data.seq_len, eng.dp_rank,
                                eng.dp_size, seed=cfg.data.seed))
    losses, hashes, seen, timings = [], [], [], []
    if it is not None:  # record what the engine reads, as read, for data-order checks
        it = (seen.append(b) or b for b in it)
    for _ in range(args.steps):
        losses.append(eng.train_step(it))
        hashes.append([digest(x, y) for x, y in seen])
        seen.clear()
        timings.append(eng.timings)

    if args.checkpoint:
        from hgscale.checkpoint.manager import CheckpointManager
        g = torch.Generator().manual_seed(7)
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
        y = torch.roll(x, -1, 1)
        if eng.pipeline:
            res = eng.engine.eval_batch(iter([(x, y)]) if eng.reads_data else None, return_logits=True,
                                        num_micro_batches=1)
            logits = res[1][:, :cfg.data.seq_len] if eng.is_last else None
        else:
            eng.engine.eval()
            with torch.no_grad():
                logits = eng.engine.module.model(x)
        if logits is not None and rt.rank == (rt.world_size - 1 if eng.pipeline else 0):
            torch.save({"inputs": x, "logits": logits.detach().float()}, out / "logits.pt")
        CheckpointManager(cfg, eng, ds_json).save(args.steps, {}, run_id=None)

    torch.save(named_params(eng), out / f"params_rank{rt.rank}.pt")
    (out / f"rank{rt.rank}.json").write_text(json.dumps(
        {"rank": rt.rank, "stage": eng.stage_id, "dp_rank": eng.dp_rank, "reads_data": eng.reads_data,
         "is_first": eng.is_first, "is_last": eng.is_last, "losses": losses, "hashes": hashes,
         "timings": timings, "compiled_layers": compiled_layers(eng)}))
    eng.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
