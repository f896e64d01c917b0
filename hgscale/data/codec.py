"""Text <-> token ids of one model, as its dataset holds them: UTF-8 bytes (vocabulary 256) or the dataset's
SentencePiece model, line by line (:mod:`hgscale.data.spm_lines`). Evaluation, sampling and serving use it.

    codec = Codec("bytes")                           # or Codec("sentencepiece", tokenizer_model_bytes)
    codec.encode("a\nb"); codec.decode(ids)          # decode stops at the first end-of-document token
    parse_ids("1,2,3", vocab_size)                   # a prompt of raw ids, for a model without a codec
    prompt_ids(text, vocab_size, codec)              # what sampling and serving feed the model
"""
from __future__ import annotations

from dataclasses import dataclass

from hgscale.data.spm_lines import NEWLINE_PIECE, decode_lines, encode_documents

DOC_END_BYTE = 0x03  # ends every document of a byte-level text dataset (ASCII "end of text")


@dataclass
class Codec:
    """Text <-> token ids of one model; ``eot`` ends a document (and begins the next)."""

    kind: str = "bytes"  # or "sentencepiece"
    spm: bytes | None = None  # the serialized SentencePiece model
    eot: int = DOC_END_BYTE

    def __post_init__(self):
        if self.kind == "sentencepiece":
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.spm)
            self.nl, self.eot = self.sp.piece_to_id(NEWLINE_PIECE), self.sp.eos_id()
            self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return encode_documents(self.sp, [text], self.nl, self.eot)[:-1]  # without its document end

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` up to the first eot (a generated document ends there)."""
        if self.eot in ids:
            ids = ids[:ids.index(self.eot)]
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        return decode_lines(self.sp, ids, self.nl)  # with the processor already loaded: no re-parse


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """Comma-separated token ids (``"1,2,3"``); ValueError naming the bad one."""
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{text[:50]!r} is not a comma-separated list of token ids such as '1,2,3'") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt id {bad[0]} is outside the vocabulary: prompt ids must lie in [0, {vocab_size})")
    return ids


def prompt_ids(text: str, vocab_size: int, codec: Codec | None = None) -> list[int]:
    """A text prompt as token ids: the SentencePiece codec's (an empty prompt starts a document), UTF-8 bytes for a
    byte-level model (an empty prompt starts after a newline, as ``hgscale sample`` does), else comma-separated ids
    (:func:`parse_ids`)."""
    if codec is not None and codec.kind == "sentencepiece":
        return codec.encode(text) or [codec.eot]
    if vocab_size == 256:
        return list(text.encode("utf-8")) or [10]
    return parse_ids(text, vocab_size)
