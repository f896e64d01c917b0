"""Tokenizers of the text pipeline: UTF-8 bytes, or SentencePiece trained on a sample or reused.

Documents in the token stream (README "Data"): every document is followed by one end-of-document token,
byte 0x03 (ASCII "end of text") for bytes and SentencePiece's ``</s>`` for SentencePiece. SentencePiece
encodes line by line and puts the ``<nl>`` piece between lines, so the text round-trips. Both count the
same raw bytes per document, UTF-8 bytes + 1 for its end, so bits per byte compare across tokenizers.
"""
from __future__ import annotations

import io
from typing import Iterable

import numpy as np

from hgscale.data.codec import DOC_END_BYTE
from hgscale.data.errors import DataError
from hgscale.data.spm_lines import NEWLINE_PIECE, decode_lines, encode_documents

NEWLINE = NEWLINE_PIECE
TOKENIZERS = ("bytes", "sentencepiece")


class BytesTokenizer:
    kind, modality, vocab_size, model = "bytes", "text_bytes", 256, None
    document_end = DOC_END_BYTE

    def encode(self, texts: list[str], raws: list[bytes]) -> np.ndarray:
        """Tokens of documents ``raws`` (their UTF-8), each followed by the end byte: uint8 (N,)."""
        end = bytes([DOC_END_BYTE])
        return np.frombuffer(end.join(raws) + end, np.uint8)


class SentencePieceTokenizer:
    kind, modality = "sentencepiece", "text_sentencepiece"

    def __init__(self, model: bytes, where: str = "the tokenizer"):
        import sentencepiece as spm
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.nl, self.document_end = self.sp.piece_to_id(NEWLINE), self.sp.eos_id()
        if self.nl == self.sp.unk_id():
            raise DataError(f"{where} has no {NEWLINE!r} piece; train one here (leave out --tokenizer-model)")
        if self.document_end < 0:
            raise DataError(f"{where} has no end-of-sequence piece (eos_id = -1) to end documents; train one here "
                            f"(leave out --tokenizer-model)")
        self.vocab_size = self.sp.get_piece_size()
        self.dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32

    def encode(self, texts: list[str], raws: list[bytes]) -> np.ndarray:
        return np.asarray(encode_documents(self.sp, texts, self.nl, self.document_end), self.dtype)


def make_tokenizer(kind: str, model: bytes | None = None, where: str = "the tokenizer"):
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "sentencepiece":
        if not model:
            raise DataError("--tokenizer sentencepiece needs a model: pass --tokenizer-model or let one be trained")
        return SentencePieceTokenizer(model, where)
    raise DataError(f"--tokenizer {kind!r} is not one of {', '.join(TOKENIZERS)}")


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, model_type: str, threads: int) -> bytes:
    """A serialized SentencePiece model trained on ``sentences`` (lines of text)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([s for s in sentences if s.strip()]), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, user_defined_symbols=[NEWLINE], hard_vocab_limit=False,
            remove_extra_whitespaces=False,  # keep indentation: the corpora hold code
            byte_fallback=True,  # a character the sample lacked still round-trips (as its UTF-8 bytes)
            normalization_rule_name="identity",  # no NFKC: the text decodes to exactly its bytes
            num_threads=max(1, threads), minloglevel=2, input_sentence_size=2_000_000, shuffle_input_sentence=True)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed ({str(e)[:200]}); raise --tokenizer-sample-bytes or lower "
                        f"--vocab-size") from None
    return buf.getvalue()


def decode_documents(model: bytes, ids: Iterable[int]) -> list[str]:
    """Documents of a SentencePiece token stream (the inverse of SentencePieceTokenizer.encode up to
    normalisation); a trailing unfinished document is returned too."""
    tok = SentencePieceTokenizer(model)
    docs, cur = [], []
    for i in (int(x) for x in ids):
        if i == tok.document_end:
            docs.append(decode_lines(tok.sp, cur, tok.nl))
            cur = []
        else:
            cur.append(i)
    if cur:
        docs.append(decode_lines(tok.sp, cur, tok.nl))
    return docs
