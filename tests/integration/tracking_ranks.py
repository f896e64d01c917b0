"""Two-rank job for test_tracking_distributed: every rank builds a Tracker; only rank 0 may create a run.

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/tracking_ranks.py RUN_DIR URI EXPERIMENT OUT

Each rank writes OUT/rank{r}.json: {"rank", "run_id", "closed"}. A file per rank, not a line on stdout: the
ranks share one stdout, where their lines can run into each other.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hgscale.config import Config
from hgscale.tracking import Tracker, names


def write_result(out: Path, rank: int, result: dict) -> None:
    """OUT/rank{r}.json, complete or absent: written to a temporary name, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / f"rank{rank}.json")


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Config()
    cfg.run_dir, cfg.tracking.uri, cfg.tracking.experiment = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg.data.url = "unused"
    cfg.tracking.run_name = "two-ranks"
    cfg.parallel.pipeline_stages = 2
    tr = Tracker(cfg, rank, world)
    tr.log_run_info(cfg, {"train_batch_size": 4}, {"nodes": 1, "pipeline_stages": 2, "data_parallel": 1},
                    None, {"imbalance": 1.05})
    for step in range(1, 21):
        # each stage's share of a "loss", summed across ranks as a real collective would
        loss = torch.tensor([1.0 / step + rank])
        dist.all_reduce(loss)
        tr.log_metrics({names.TRAIN_LOSS: loss.item(), names.FLOPS: 1e9 * step}, step)
        if step % 5 == 0:   # every rank, same steps: a collective
            tr.gather_and_log(step, {"step_s": 0.1 + 0.01 * rank, "compute_s": 0.05 + 0.02 * rank,
                                     "wait_s": 0.05 - 0.01 * rank}, stage=rank)
    ok = tr.close()
    dist.barrier()
    write_result(Path(sys.argv[4]), rank, {"rank": rank, "run_id": tr.run_id, "closed": ok})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
