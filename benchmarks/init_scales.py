"""Scales at initialisation: per layer of each model and model.init, the standard deviation of its weights and the RMS
of the residual stream it hands on, on one batch of real text (the demo corpus's bytes), and the loss before step 1.

    python benchmarks/init_scales.py --config configs/study_small.json --models "2@1 8@4 2@1,6@1" --init trax,normal

Why a scheme suits one model and not another shows here before any training: a weight's scale sets how much each
residual branch adds, and the LayerNorm at the end of an Hourglass's valley (``skip + LN(up)``) adds a unit-RMS vector
to the token-level stream whatever the weights, so the smaller the stream (a small embedding), the more the shortened
path decides what the full-resolution layers after it see. Rows: layer, kind, group (model.init_layers), weight std,
stream RMS after the layer (the logits' std for the head).
"""
from __future__ import annotations

import dataclasses
import sys

import common
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.demo_corpus import corpus_bytes
from hgscale.config import load_config
from hgscale.models import HourglassLM
from hgscale.models.hourglass import layer_group, layer_plan


def text_batch(batch: int, seq_len: int) -> torch.Tensor:
    """(batch, seq_len + 1) bytes of the demo corpus, from evenly spaced offsets (the same for every model)."""
    data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    step = (len(data) - seq_len - 1) // batch
    return torch.stack([data[i * step:i * step + seq_len + 1] for i in range(batch)])


def weight_std(layer: nn.Module) -> float:
    ws = [m.weight.detach().flatten() for m in layer.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return float(torch.cat(ws).std()) if ws else float("nan")


@torch.no_grad()
def scales(model_cfg, tokens: torch.Tensor, seed: int = 0) -> dict:
    """Per layer {index, kind, group, weight_std, rms}; the loss (nats/token) of the untrained model on ``tokens``."""
    model = HourglassLM(model_cfg, seed=seed).eval()
    x, y = tokens[:, :-1], tokens[:, 1:]
    state, rows = x, []
    for i, layer in enumerate(model.layers):
        state = layer(state)
        out = state if isinstance(state, torch.Tensor) else state[0]
        rows.append({"index": i, "kind": layer_plan(model_cfg)[i][0], "group": layer_group(model_cfg, i),
                     "weight_std": weight_std(layer), "rms": float(out.float().pow(2).mean().sqrt()) if
                     isinstance(state, tuple) else float(out.std())})
    logits = state[:, :x.shape[1]]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return {"layers": rows, "loss": float(loss)}


def table(name: str, init: str, res: dict) -> str:
    lines = [f"{name}, {init}: loss before step 1 {res['loss']:.3f} nats/token",
             "| layer | kind | group | weight std | RMS after |", "|---|---|---|---|---|"]
    lines += [f"| {r['index']} | {r['kind']} | {r['group']} | {r['weight_std']:.4f} | {r['rms']:.3f} |"
              for r in res["layers"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--config", default="configs/study_small.json")
    ap.add_argument("--models", default="2@1 8@4 2@1,6@1", help="hierarchies, comma-separated")
    ap.add_argument("--init", default="trax,normal", help="model.init schemes, comma-separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.d_model=128")
    common.add_out(ap, "init_scales")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tokens = text_batch(args.batch, cfg.data.seq_len)
    result = {"command": common.command(__file__, argv), "seq_len": cfg.data.seq_len, "models": {}}
    layers = f" model.init_layers='{cfg.model.init_layers}'" if cfg.model.init_layers else ""
    for h in args.models.split(","):
        for init in args.init.split(","):
            res = scales(dataclasses.replace(cfg.model, hierarchy=h.strip(), init=init, dropout=0.0), tokens)
            result["models"][f"{h.strip()} / {init}{layers}"] = res
            print(table(h.strip(), f"model.init={init}{layers}", res) + "\n")
    common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
