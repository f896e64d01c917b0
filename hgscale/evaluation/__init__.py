"""Evaluation of trained models: split scores (:mod:`.splits`); text scoring and generation on one device
(:mod:`.textlm`) and lm-evaluation-harness tasks through them (:mod:`.harness`, which alone imports lm_eval).

Import the submodules directly."""
