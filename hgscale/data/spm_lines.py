"""Text <-> SentencePiece ids the way our text datasets hold them: SentencePiece encodes line by line and the
``<nl>`` piece stands between lines (so indentation and blank lines round-trip), and every document ends with
``</s>``. One code for every place that needs it: the data pipeline's encoder, evaluation and serving, and the
tokenizer file a Hugging Face export ships (hgscale.checkpoint.hf.bundle copies this module into it, so it
imports nothing but the standard library).

    ids = encode_documents(sp, ["a\\nb"], nl, end)   # [*sp.encode("a"), nl, *sp.encode("b"), end]
    text = decode_lines(sp, ids[:-1], nl)            # "a\\nb"
"""
from __future__ import annotations

NEWLINE_PIECE = "<nl>"


def encode_documents(sp, texts: list[str], nl: int, end: int) -> list[int]:
    """Ids of ``texts``, each followed by ``end``; one SentencePiece call for every line of the batch (the C++ side
    does the work). ``sp``: a sentencepiece.SentencePieceProcessor."""
    lines, counts = [], []
    for t in texts:
        parts = t.split("\n")
        lines += parts
        counts.append(len(parts))
    ids = sp.encode(lines)
    out: list[int] = []
    i = 0
    for c in counts:
        for j in range(c):
            out += ids[i + j]
            out.append(nl if j < c - 1 else end)
        i += c
    return out


def decode_lines(sp, ids: list[int], nl: int) -> str:
    """The text of ``ids`` (no document end inside): lines decoded one by one, joined by newlines."""
    lines, cur = [], []
    for i in ids:
        if i == nl:
            lines.append(cur)
            cur = []
        else:
            cur.append(i)
    return "\n".join(sp.decode(line) for line in [*lines, cur])
