"""The tokenizer an exported Hugging Face model ships: ``AutoTokenizer.from_pretrained(DIR)`` gives the ids the
model was trained on.

Byte-level models (vocabulary 256, the text_bytes datasets): a ``tokenizers`` byte-level BPE with no merges whose
id of each byte is the byte's value, so ``tokenizer(text).input_ids == list(text.encode("utf-8"))`` and decode is
its inverse. No special tokens: the corpora have none (documents end with a byte of their own). Image models get
no tokenizer (their ids are pixel intensities); other vocabularies (SentencePiece datasets) are refused by name,
since their line-by-line encoding has no exact transformers equivalent here yet.
"""
from __future__ import annotations

from pathlib import Path

from hgscale.checkpoint.layout import CheckpointError
from hgscale.config import Config


def write_tokenizer(cfg: Config, out: Path, modality: str | None) -> list[str]:
    """Write the tokenizer files of ``cfg``'s model into ``out``; returns their names (none for images)."""
    if modality == "image":
        return []
    if cfg.model.vocab_size != 256 or modality not in (None, "text_bytes"):
        raise CheckpointError(f"--format hf has no tokenizer for a {modality or 'non-byte'} model of vocabulary "
                              f"{cfg.model.vocab_size}: only byte-level text and image models export to Hugging "
                              f"Face; use --format hgscale")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    shown = bytes_to_unicode()  # GPT-2's printable stand-in of each byte; ByteLevel maps text bytes onto them
    tok = Tokenizer(models.BPE(vocab={shown[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=cfg.model.max_seq_len)
    return [Path(f).name for f in fast.save_pretrained(str(out)) if Path(f).parent == out]
