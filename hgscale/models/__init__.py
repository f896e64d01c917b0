"""Single-device model code: imports neither deepspeed nor torch.distributed."""
from hgscale.models.flops import flops_per_token, layer_flops, layer_params
from hgscale.models.hourglass import (
                                      HourglassLM,
                                      build_layer,
                                      build_layers,
                                      layer_constructors,
                                      layer_plan,
                                      state_shapes,
)
from hgscale.models.loss import lm_loss

__all__ = ["HourglassLM", "build_layer", "build_layers", "layer_constructors", "layer_plan", "state_shapes",
           "flops_per_token", "layer_flops", "layer_params", "lm_loss"]
