"""Hourglass -> DeepSpeed PipelineModule, split into stages balanced by compute.

The model is already a flat list of layers (hgscale.models.build_layers): embed, blocks, down, up,
head, each mapping a state tuple to the next. The pipeline passes that tuple between stages:

    stage 0                         | stage 1                          | stage 2
    embed, blocks@1, down ->        | (x/3, uv, skip) blocks@3 ... up  | (x, uv) blocks@1, head -> logits
    (x (B,T,D), uv (2,H,dh))        |                                  |

- uv, the shared relative-attention biases, is one tensor made by the embedding layer on stage 0; each
  stage's blocks use the copy that arrives in the tuple and DeepSpeed sends its gradient back, so the
  single parameter on stage 0 receives the gradient of every block on every stage.
- The residual skip pushed by a shortening layer rides along until its upsampling layer pops it.
- DeepSpeed requires every floating tensor received by a stage to get a gradient: the head only reads
  x, so it adds ``0 * sum(extras)`` to keep uv on the gradient path (exact: the gradient it adds is 0).

Stages are balanced by per-layer training FLOPs at the layer's own sequence length (a block at factor
k costs about 1/k of a full-length one), with DeepSpeed's ``partition_balanced`` on those costs.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from hgscale.checkpoint.export import layer_weights
from hgscale.config import Config
from hgscale.models import build_layer, layer_flops, layer_params, layer_plan, lm_loss
from hgscale.training.recompute import recompute_in_backward, recomputed_layers


def layer_names(cfg: Config) -> list[str]:
    """'embed', 'block@1', 'down 1->3', 'up 3->1', 'head' in model order."""
    def name(kind: str, *args: int) -> str:
        if kind == "block":
            return f"block@{args[0]}"
        return f"{kind} {args[0]}->{args[1]}" if kind in ("down", "up") else kind

    return [name(*item) for item in layer_plan(cfg.model)]


def layer_param_counts(cfg: Config) -> list[int]:
    """Parameters of each layer (the model's analytic count, checked against the modules in its tests)."""
    return layer_params(cfg.model)


def layer_costs(cfg: Config) -> list[float]:
    """Training FLOPs (fwd + bwd) of each layer for one sequence of data.seq_len tokens."""
    return [float(c) for c in layer_flops(cfg.model, cfg.data.seq_len)]


def _ds_utils():
    # DeepSpeed logs its accelerator detection to stdout on first import; keep stdout clean for --json
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.runtime.utils as utils
    return utils


def partition(weights: list[float], stages: int) -> list[int]:
    """Stage boundaries: stage s holds layers [parts[s], parts[s+1])."""
    partition_balanced = _ds_utils().partition_balanced
    return [int(p) for p in partition_balanced(weights=list(weights), num_parts=stages)]


def stage_parts(cfg: Config, stages: int, method: str | None = None) -> list[int]:
    partition_uniform = _ds_utils().partition_uniform
    method = method or cfg.parallel.partition
    if method == "flops":
        return partition(layer_costs(cfg), stages)
    if method == "parameters":
        return partition([float(p) for p in layer_param_counts(cfg)], stages)
    return [int(p) for p in partition_uniform(len(layer_plan(cfg.model)), stages)]


def _keep_extras_on_grad_path(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    state = inputs[0]
    extras = [t for t in state[1:] if t.is_floating_point()] if isinstance(state, tuple) else []
    if not extras:
        return output
    return output + 0.0 * sum(t.sum() for t in extras)


def pipeline_module(cfg: Config, parts: list[int], initial: dict | None = None, topology=None):
    """The DeepSpeed PipelineModule of ``cfg.model`` split at ``parts``; each stage builds only its layers (with
    their entries of ``initial``, HourglassLM weights, when given)."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    names, recomputed = layer_names(cfg), recomputed_layers(cfg)

    class _Spec(LayerSpec):
        def __init__(self, index: int):
            self.index = index
            # DeepSpeed prints and matches layers by typename: give each its readable name
            self.typename = type(names[index], (nn.Module,), {})
            self.module_args, self.module_kwargs = (), {}

        def build(self, log=False):
            layer = build_layer(cfg.model, self.index, seed=cfg.train.seed)
            if initial is not None:
                layer.load_state_dict(layer_weights(initial, self.index))
            if self.index in recomputed:
                recompute_in_backward(layer)
            if layer.kind == "head":
                layer.register_forward_hook(_keep_extras_on_grad_path)
            return layer

    class HourglassPipe(PipelineModule):
        def _partition_layers(self, method="uniform"):
            # DeepSpeed offers parameters/uniform/type: splits; ours come precomputed from costs.
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    n = len(layer_plan(cfg.model))
    if len(parts) != cfg.parallel.pipeline_stages + 1 or parts[0] != 0 or parts[-1] != n:
        raise ValueError(f"stage boundaries {parts} do not split {n} layers into {cfg.parallel.pipeline_stages} stages")
    return HourglassPipe(layers=[_Spec(i) for i in range(n)], num_stages=cfg.parallel.pipeline_stages,
                         topology=topology, loss_fn=lm_loss, partition_method="uniform",
                         activation_checkpoint_interval=0)  # per layer, by level: recompute_in_backward
