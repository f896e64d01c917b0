"""Writes the Hugging Face directory of a checkpoint (see :mod:`hgscale.checkpoint.hf`)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from hgscale.checkpoint.hf import AUTO_MAP, MODELING_FILE, PREFIX
from hgscale.checkpoint.layout import CheckpointError

log = logging.getLogger(__name__)


def export_hf(root: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write the Hugging Face directory of checkpoint ``root`` (its ``tag``, default latest) into ``out``."""
    from safetensors.torch import save_file

    from hgscale.checkpoint.export import export_dir, load_any, training_dataset
    from hgscale.checkpoint.hf.bundle import modeling_source
    from hgscale.checkpoint.hf.tokenizer import write_tokenizer
    from hgscale.checkpoint.run_link import checkpoint_run, save_run_file

    source = Path(root) / tag if tag else Path(root)
    model, cfg = load_any(source)
    if cfg.model.vanilla_attention == "lsh":  # refused by name, before anything is written
        raise CheckpointError("--format hf cannot express model.vanilla_attention = 'lsh': LSH attention draws "
                              "fresh random rotations at every call, so its logits are no function of the weights "
                              "alone, and it has no cached decoding for generate(); use --format hgscale")
    out = export_dir(out)
    (out / MODELING_FILE).write_text(modeling_source())
    _config(cfg).to_json_file(str(out / "config.json"))
    save_file({PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    dataset = training_dataset(cfg)
    if dataset is None and cfg.model.vocab_size == 256:
        log.warning("the training data (%s) cannot be read: exported as a byte-level text model", cfg.data.url)
    modality = dataset.modality if dataset is not None else None
    tokenizer_files = write_tokenizer(cfg, out, dataset)
    (out / "README.md").write_text(_card(cfg, modality, tokenizer_files))
    save_run_file(checkpoint_run(source), out)  # later scores (hgscale evaluate DIR) go to the training run
    return out


def _config(cfg):
    """HourglassConfig of ``cfg.model`` with the keys transformers reads to find and build the model."""
    from hgscale.checkpoint.hf.modeling import HourglassConfig

    values = {**dataclasses.asdict(cfg.model), "size": "", "init_from": ""}  # no path of the machine it came from
    return HourglassConfig(**values, architectures=["HourglassForCausalLM"],
                           auto_map=AUTO_MAP, dtype="float32")


def _card(cfg, modality: str | None, tokenizer_files: list[str]) -> str:
    m = cfg.model
    use = ("tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)\n"
           "ids = tok(\"The \", return_tensors=\"pt\").input_ids\n"
           "print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))"
           if tokenizer_files else "# ids are pixel intensities 0..255, row by row")
    return (f"---\nlibrary_name: transformers\ntags: [hourglass, hgscale]\n---\n\n# Hourglass {m.hierarchy!r}\n\n"
            f"A hierarchical Transformer (Nawrot et al. 2021) trained with hgscale: d_model {m.d_model}, "
            f"{m.n_heads} heads, hierarchy `{m.hierarchy}` (layers@shortening factor), {m.downsample} shortening, "
            f"{m.upsample} upsampling, {m.attention} attention, vocabulary {m.vocab_size} "
            f"({modality or 'text_bytes'}), up to {m.max_seq_len} tokens.\n\n```python\n"
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)\n{use}\n```\n\n"
            f"Prompts of one batch must have equal lengths (the model has no padding mask).\n")
