"""Evaluation of trained models: split scores (:mod:`.splits`).

Import the submodules directly."""
