"""Activation checkpointing by level (``parallel.activation_checkpointing``): the layers of the chosen levels of
the hierarchy keep only their input for the backward pass and run their forward again there.

    for i in recomputed_layers(cfg): recompute_in_backward(layers[i])

The full-resolution levels hold most of the activations (a level at factor k keeps 1/k of their tokens), so
``"full_resolution"`` keeps most of the saving of ``"all"`` for a fraction of its recompute.
"""
from __future__ import annotations

from torch import nn

from hgscale.config import Config
from hgscale.core.notation import checkpointed_levels
from hgscale.models.hourglass import layer_levels


def recomputed_layers(cfg: Config, policy=None) -> set[int]:
    """Indices (into the model's layer list) of the layers ``policy`` (default: parallel.activation_checkpointing)
    recomputes; never the embedding or the head."""
    policy = cfg.parallel.activation_checkpointing if policy is None else policy
    levels = checkpointed_levels(policy, cfg.model.levels())
    return {i for i, level in enumerate(layer_levels(cfg.model)) if level in levels}


def recompute_in_backward(layer: nn.Module) -> None:
    """Keep only ``layer``'s input for backward and run its forward again there. Done from outside (the model
    stays free of training concerns); state-dict keys do not change. Non-reentrant: inputs that need no
    gradient (a pipeline stage's received tensors) still get one where the graph asks."""
    from torch.utils.checkpoint import checkpoint

    inner = layer.forward
    layer.forward = lambda state, _f=inner: checkpoint(_f, state, use_reentrant=False)
