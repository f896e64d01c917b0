"""The tokenizer of an Hourglass model trained on SentencePiece text, for transformers (AutoTokenizer).

    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)   # DIR from hgscale export --format hf
    tok("a\nb").input_ids      # the ids our dataset holds for that text: lines encoded one by one, <nl> between

Exact to the datasets the model was trained on because it encodes with the same code (hgscale.data.spm_lines,
bundled into the exported file beside this class): ``tokenizer.model`` is the dataset's SentencePiece model, and
``</s>``, which ends every document in the training stream, is the end-of-sequence token.
"""
from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

from hgscale.data.spm_lines import NEWLINE_PIECE, decode_lines, encode_documents


class HourglassSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.nl = self.sp.piece_to_id(NEWLINE_PIECE)
        kwargs.setdefault("eos_token", self.sp.id_to_piece(self.sp.eos_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # the text decodes to exactly its bytes
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        ids = encode_documents(self.sp, [text], self.nl, -1)[:-1]  # a prompt: no document end after it
        return [self.sp.id_to_piece(i) for i in ids]

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return decode_lines(self.sp, [self.sp.piece_to_id(t) for t in tokens], self.nl)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
