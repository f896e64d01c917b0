"""Hugging Face export: a checkpoint as a directory ``huggingface_hub.upload_folder`` publishes as it is.

    export_hf("runs/demo/checkpoints", "runs/demo/hf")     # hgscale.checkpoint.hf.writer; a checkpoint or an export
    model = AutoModelForCausalLM.from_pretrained("runs/demo/hf", trust_remote_code=True)

The directory holds config.json (our model keys, ``auto_map`` to the modeling file), modeling_hourglass.py
(:mod:`hgscale.checkpoint.hf.bundle`: our model code in one file, torch and transformers only),
model.safetensors (HourglassForCausalLM's names: ``model.`` + HourglassLM's), the tokenizer
(:mod:`hgscale.checkpoint.hf.tokenizer`), a model card and run.json (the MLflow run that trained it).
``model.init_from`` reads it back (:func:`hgscale.checkpoint.export.load_any`).
"""
from __future__ import annotations

import json
from pathlib import Path

from hgscale.checkpoint.layout import CheckpointError

MODELING_FILE = "modeling_hourglass.py"
AUTO_MAP = {"AutoConfig": "modeling_hourglass.HourglassConfig",
            "AutoModelForCausalLM": "modeling_hourglass.HourglassForCausalLM"}
PREFIX = "model."  # HourglassForCausalLM.model is the HourglassLM


def read_hf_config(path: Path) -> dict:
    """Our model keys from an exported Hugging Face directory's config.json."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path / 'config.json')!r} is missing or corrupt ({e}): export again") from None
    from hgscale.config import ModelConfig

    keys = {f for f in ModelConfig.__dataclass_fields__}
    return {k: v for k, v in raw.items() if k in keys}


def is_hf_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory ``hgscale export --format hf`` wrote (it ships the modeling file)."""
    return (Path(path) / MODELING_FILE).is_file()
