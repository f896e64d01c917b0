"""Cost of layout-independent dropout masks (hgscale.models.dropout.DropoutKeys): training steps of the same model
with dropout, timed side by side, alternating, with the keyed generator seeding and with one stream per rank.

    python benchmarks/dropout_keys.py [--threads 1] [--steps 30] [--micro 4] [--accum 4] [--seq-len 256]

Prints the median step time of each and their ratio (goal: keyed <= 1.02 x plain).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from hgscale.config import config_from_dict  # noqa: E402
from hgscale.models import HourglassLM, lm_loss  # noqa: E402
from hgscale.models.dropout import DropoutKeys  # noqa: E402


class Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return lm_loss(self.model(x), y)


def build(keyed: bool, args):
    cfg = config_from_dict({"model": {"size": "small", "dropout": 0.1, "attn_dropout": 0.1, "max_seq_len": 2048},
                            "data": {"url": "/d", "seq_len": args.seq_len}}).model
    m = Loss(HourglassLM(cfg, seed=1).train())
    keys = DropoutKeys(1) if keyed else None
    if keys is not None:
        keys.attach(m, list(enumerate(m.model.layers)))
    return m, keys, torch.optim.Adam(m.parameters(), lr=1e-4)


def step(m, keys, opt, batches, n: int) -> float:
    t0 = time.perf_counter()
    if keys is not None:
        keys.begin_step(n, 0)
    for x, y in batches:
        m(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = common.parser(__doc__)
    common.add_threads(ap)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    common.add_out(ap, "dropout_keys")
    args = ap.parse_args(argv)
    common.apply_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (args.micro, args.seq_len), generator=g),
                torch.randint(0, 256, (args.micro, args.seq_len), generator=g)) for _ in range(args.accum)]
    runs = {"plain": build(False, args), "keyed": build(True, args)}
    times = {k: [] for k in runs}
    for n in range(args.steps + 2):  # alternate, so both see the same machine; the first two are warm-up
        for name, (m, keys, opt) in runs.items():
            t = step(m, keys, opt, batches, n)
            if n >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["keyed"] / med["plain"]
    print(f"median step: plain {med['plain'] * 1e3:.1f} ms, keyed {med['keyed'] * 1e3:.1f} ms, ratio {ratio:.4f} "
          f"({args.micro} x {args.seq_len} tokens x {args.accum} micro-batches, {args.threads} thread(s))")
    common.write_result(args.out, {"command": common.command(__file__, argv), "median_s": med, "ratio": ratio,
                                   "steps": args.steps})


if __name__ == "__main__":
    main()
