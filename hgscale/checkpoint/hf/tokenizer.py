"""The tokenizer an exported Hugging Face model ships: ``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``
gives the ids the model was trained on.

Byte-level models (vocabulary 256, text_bytes datasets): a ``tokenizers`` byte-level BPE with no merges whose id of
each byte is the byte's value, so ``tokenizer(text).input_ids == list(text.encode("utf-8"))`` and decode is its
inverse; no special tokens (documents end with a byte of their own). SentencePiece models (text_sentencepiece
datasets): the dataset's ``tokenizer.model`` and ``tokenization_hourglass.py``, a tokenizer class bundled from
hgscale's own line-by-line encoding (:mod:`hgscale.checkpoint.hf.tokenization`). Image models: none (their ids
are pixel intensities).
"""
from __future__ import annotations

import json
from pathlib import Path

from hgscale.checkpoint.layout import CheckpointError
from hgscale.config import Config

TOKENIZER_FILE = "tokenization_hourglass.py"


def write_tokenizer(cfg: Config, out: Path, dataset) -> list[str]:
    """Write the tokenizer files of ``cfg``'s model (trained on ``dataset``, None when unreadable) into ``out``;
    returns their names (none for images)."""
    modality = dataset.modality if dataset is not None else None
    if modality == "image":
        return []
    if modality == "text_sentencepiece":
        return _sentencepiece(cfg, out, dataset)
    if cfg.model.vocab_size != 256 or modality not in (None, "text_bytes"):
        raise CheckpointError(f"--format hf has no tokenizer for a {modality or 'non-byte'} model of vocabulary "
                              f"{cfg.model.vocab_size} (its dataset {cfg.data.url!r} cannot be read to find it): "
                              f"make the dataset readable, or use --format hgscale")
    return _bytes(cfg, out)


def _bytes(cfg: Config, out: Path) -> list[str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    shown = bytes_to_unicode()  # GPT-2's printable stand-in of each byte; ByteLevel maps text bytes onto them
    tok = Tokenizer(models.BPE(vocab={shown[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=cfg.model.max_seq_len)
    return [Path(f).name for f in fast.save_pretrained(str(out)) if Path(f).parent == out]


def _sentencepiece(cfg: Config, out: Path, dataset) -> list[str]:
    """tokenizer.model (the dataset's), the bundled tokenizer file and a tokenizer_config.json pointing at it."""
    from hgscale.checkpoint.hf.bundle import TOKENIZER_MODULE, modeling_source
    from hgscale.data.io import read_bytes

    if not dataset.tokenizer_url:
        raise CheckpointError(f"dataset {cfg.data.url!r} is SentencePiece text but its manifest names no tokenizer")
    (out / "tokenizer.model").write_bytes(read_bytes(dataset.tokenizer_url, dataset.opts))
    (out / TOKENIZER_FILE).write_text(modeling_source(TOKENIZER_MODULE))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    if sp.get_piece_size() > cfg.model.vocab_size:
        raise CheckpointError(f"the tokenizer of {cfg.data.url!r} has {sp.get_piece_size()} pieces but the model "
                              f"{cfg.model.vocab_size} (model.vocab_size): it is not the dataset the model trained on")
    name = "HourglassSentencePieceTokenizer"
    config = {"tokenizer_class": name, "auto_map": {"AutoTokenizer": [f"{TOKENIZER_FILE[:-3]}.{name}", None]},
              "eos_token": sp.id_to_piece(sp.eos_id()), "model_max_length": cfg.model.max_seq_len,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return ["tokenizer.model", TOKENIZER_FILE, "tokenizer_config.json"]
