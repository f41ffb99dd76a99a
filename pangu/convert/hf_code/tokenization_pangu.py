"""The PanGu-α tokenizer for transformers (remote code): jieba, then SentencePiece.

Written by the pangu project (the scheme of pangu/data/tokenizer.py, as in the released PanGu-α
code) and copied next to the weights by `pangu convert export-hf`. It imports transformers,
sentencepiece and jieba only (not pangu).

Encoding: jieba segments the text (precise mode); inside each segment a space becomes U+2582 and a
newline U+2583; the segments are joined with single spaces (SentencePiece never merges across a
word boundary), and SentencePiece encodes the result. No special token is added.
Decoding: SentencePiece decodes, every space (the segment joints) is deleted, then U+2582 -> space
and U+2583 -> newline. Strings such as "<eot>" inside a text are encoded as text, as pangu does.
"""

from __future__ import annotations

import logging
import os
import shutil

import jieba
import sentencepiece as spm
from transformers import PreTrainedTokenizer

SPACE_SYMBOL = "\u2582"
NEWLINE_SYMBOL = "\u2583"

jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO on stderr


def presegment(text: str) -> str:
    """The exact string SentencePiece sees."""
    return " ".join(
        segment.replace(" ", SPACE_SYMBOL).replace("\n", NEWLINE_SYMBOL) for segment in jieba.cut(text, cut_all=False)
    )


class GPTPanguTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "vocab.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        eos_token: str = "<eot>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """The pieces of PanGu's encoding (added tokens are not split out of the text)."""
        return self.sp.encode(presegment(text), out_type=str)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return _restore(self.sp.decode_pieces(list(tokens)))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return _restore(self.sp.decode(ids))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + "vocab.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


def _restore(text: str) -> str:
    return text.replace(" ", "").replace(SPACE_SYMBOL, " ").replace(NEWLINE_SYMBOL, "\n")
