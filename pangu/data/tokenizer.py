"""The PanGu-alpha tokenizer: jieba word segmentation in front of a SentencePiece model.

Encoding (as in the released PanGu-alpha code):
  1. segment the text with jieba in precise mode;
  2. inside each segment, space -> U+2582 (`▂`) and newline -> U+2583 (`▃`);
  3. join the segments with single spaces, so SentencePiece never merges across a word boundary;
  4. SentencePiece encode.
Decoding reverses it: SentencePiece decode, delete every space (they are the segment joints),
then `▂` -> space and `▃` -> newline.

The released model normalises with NFKC, so full-width ASCII and punctuation come back half-width
(`，` -> `,`); everything else round-trips. Characters missing from the released vocabulary decode
to ` ⁇ `. Tokenizers trained here keep the same normaliser and use SentencePiece's byte fallback
(unknown characters become UTF-8 byte pieces), so they never produce `<unk>`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import multiprocessing
import os
import re
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import jieba
import sentencepiece as spm

from pangu.config import MIN_TRAINED_VOCAB_SIZE
from pangu.data import DataError
from pangu.files import write_atomic

SPACE_SYMBOL = "\u2582"  # ▂
NEWLINE_SYMBOL = "\u2583"  # ▃
DOCUMENT_SEPARATOR = "<eot>"  # id 9: the separator the original training put after every document
PAD = "<pad>"  # id 6
RELEASED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "pangu-alpha" / "vocab.model"
TOKENIZER_FILE = "tokenizer.model"  # a tokenizer's file name, in a prepared directory and in a checkpoint
# Ids 0, 1, 2 are SentencePiece's own <unk>, <s>, </s>; these follow them at ids 3..9, in the
# released model's order, so that a tokenizer trained here shares every special id with it.
SPECIAL_PIECES = (NEWLINE_SYMBOL, SPACE_SYMBOL, "<sep>", PAD, "<mask>", "<eod>", DOCUMENT_SEPARATOR)
NUM_BYTE_PIECES = 256

jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO


def load_jieba() -> None:
    """Load jieba's dictionary now (about a second, once per process; the first cut would do it
    otherwise). Call it before forking workers so that they inherit the loaded dictionary."""
    jieba.initialize()


def presegment(text: str) -> str:
    """Steps 1-3 of the encoding: the exact string that SentencePiece sees."""
    return " ".join(
        segment.replace(" ", SPACE_SYMBOL).replace("\n", NEWLINE_SYMBOL) for segment in jieba.cut(text, cut_all=False)
    )


class PanguTokenizer:
    """A SentencePiece model used the PanGu way. Picklable (it travels as the model's bytes), so
    it can be handed to worker processes."""

    def __init__(self, model_bytes: bytes, name: str = "<memory>") -> None:
        self._model_bytes = model_bytes
        self._name = name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except RuntimeError as err:
            raise DataError(f"tokenizer {name}: not a SentencePiece model ({err})") from None
        for piece in (SPACE_SYMBOL, NEWLINE_SYMBOL, PAD, DOCUMENT_SEPARATOR):
            if self._piece_id(piece) is None:
                raise DataError(
                    f"tokenizer {name}: the model has no {piece!r} piece, so it cannot be "
                    f"used with the PanGu scheme; use the released vocab.model or train one "
                    f"with data.tokenizer.kind = 'train'"
                )

    @classmethod
    def from_file(cls, path: str | Path) -> PanguTokenizer:
        """Load a SentencePiece model file. A relative path is relative to the working directory."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer model {str(path)!r} does not exist (resolved against the working "
                f"directory {os.getcwd()!r}); set data.tokenizer.path to a SentencePiece "
                f".model file, e.g. the released pangu-alpha vocab.model"
            )
        return cls(path.read_bytes(), str(path))

    def __reduce__(self) -> tuple[type, tuple[bytes, str]]:
        return PanguTokenizer, (self._model_bytes, self._name)

    def _piece_id(self, piece: str) -> int | None:
        piece_id = self._sp.piece_to_id(piece)
        return piece_id if self._sp.id_to_piece(piece_id) == piece else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """The document separator appended after every document (`<eot>`, 9 in the released model)."""
        return self._sp.piece_to_id(DOCUMENT_SEPARATOR)

    @property
    def pad_id(self) -> int:
        return self._sp.piece_to_id(PAD)

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file: two tokenizers with the same fingerprint encode identically."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(presegment(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode([presegment(text) for text in texts])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Byte-fallback pieces that begin a character the ids do not finish
        (a generated sample cut after the first bytes of a rare character) are left out rather
        than decoded as U+FFFD: no text ends in half a character."""
        ids = [int(i) for i in ids]
        text = self._sp.decode(ids[: len(ids) - self._unfinished_character(ids)])
        return text.replace(" ", "").replace(SPACE_SYMBOL, " ").replace(NEWLINE_SYMBOL, "\n")

    def _unfinished_character(self, ids: list[int]) -> int:
        """How many byte pieces at the end of `ids` are the first bytes of an unfinished UTF-8
        character (0 when the ids end in a whole character)."""
        for back in range(1, min(4, len(ids) + 1)):  # a character has at most 4 bytes
            if not self._sp.is_byte(ids[-back]):
                return 0
            byte = int(self._sp.id_to_piece(ids[-back])[3:5], 16)  # the piece is "<0xNN>"
            if byte >> 6 != 0b10:  # not a continuation byte: the character starts here
                length = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
                return back if back < length else 0
        return 0

    @staticmethod
    def train(
        lines: Iterable[str],
        out_path: str | Path,
        vocab_size: int,
        algorithm: Literal["bpe", "unigram"] = "bpe",
        *,
        num_threads: int = 2,
    ) -> PanguTokenizer:
        """Train a SentencePiece model on `lines` (raw text, pre-segmented here exactly as encode
        does), with the released model's special pieces at the released ids (0 `<unk>`, 1 `<s>`,
        2 `</s>`, 3 `▃`, 4 `▂`, 5 `<sep>`, 6 `<pad>`, 7 `<mask>`, 8 `<eod>`, 9 `<eot>`), then 256
        byte-fallback pieces, then the learned ones. Writes `out_path` atomically."""
        check_trainable_vocab_size(vocab_size)
        sentences = [_trainer_line(presegment(line)) for line in lines]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise DataError("cannot train a tokenizer on an empty corpus")
        # SentencePiece refuses to train when the characters it must keep as single pieces do not
        # fit in the vocabulary (and it will not lower character_coverage below 0.98). Keep at most
        # half of the free vocabulary as characters: rarer characters are blanked out of the
        # training text and left to byte fallback.
        free_pieces = vocab_size - 3 - len(SPECIAL_PIECES) - NUM_BYTE_PIECES
        sentences = _restrict_alphabet(sentences, max_characters=free_pieces // 2)
        options = dict(
            vocab_size=vocab_size,
            model_type=algorithm,
            user_defined_symbols=list(SPECIAL_PIECES),
            byte_fallback=True,
            normalization_rule_name="nmt_nfkc",
            max_sentence_length=_MAX_TRAINER_LINE_BYTES,
            num_threads=num_threads,
            minloglevel=2,
        )
        # SentencePiece trains in C++ for minutes on a large sample, deaf to signals: it runs in a
        # process of its own, which this one waits for where Ctrl-C and SIGTERM are heard (and
        # ends, leaving the pool, when they come)
        with multiprocessing.get_context("spawn").Pool(1, initializer=_leave_ctrl_c_to_the_parent) as pool:
            try:
                model = pool.apply(_train_sentencepiece, (sentences, options))
            except RuntimeError as err:
                raise DataError(
                    f"training a {algorithm} tokenizer with data.tokenizer.vocab_size = {vocab_size} "
                    f"failed: {err}. A vocabulary too large for the corpus is the usual cause: "
                    f"lower data.tokenizer.vocab_size"
                ) from None
        write_atomic(out_path, model)
        return PanguTokenizer(model, str(out_path))


def _train_sentencepiece(sentences: list[str], options: dict) -> bytes:
    """(In the trainer's process) the serialized model SentencePiece trains on `sentences`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    return model.getvalue()


def _leave_ctrl_c_to_the_parent() -> None:
    # Ctrl-C reaches the whole process group: the parent ends the trainer (a traceback here says nothing)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_trainable_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_TRAINED_VOCAB_SIZE:
        raise DataError(
            f"data.tokenizer.vocab_size = {vocab_size} is too small to train: the special and "
            f"byte pieces alone take {3 + len(SPECIAL_PIECES) + NUM_BYTE_PIECES}; use at least "
            f"{MIN_TRAINED_VOCAB_SIZE}"
        )


# SentencePiece skips training lines longer than this (in bytes); longer documents are cut at
# segment boundaries instead of being dropped.
_MAX_TRAINER_LINE_BYTES = 1 << 14


def _trainer_line(segmented: str) -> str:
    """Cut a pre-segmented document to at most _MAX_TRAINER_LINE_BYTES (at a segment boundary)."""
    if len(segmented.encode("utf-8")) <= _MAX_TRAINER_LINE_BYTES:
        return segmented
    # 4 bytes per character is the UTF-8 worst case, so this many characters always fit
    cut = segmented[: _MAX_TRAINER_LINE_BYTES // 4]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def _restrict_alphabet(sentences: list[str], max_characters: int) -> list[str]:
    counts = collections.Counter()
    for sentence in sentences:
        counts.update(sentence)
    for symbol in (" ", SPACE_SYMBOL, NEWLINE_SYMBOL):
        counts.pop(symbol, None)
    if len(counts) <= max_characters:
        return sentences
    rare = "".join(re.escape(c) for c, _ in counts.most_common()[max_characters:])
    rare_run = re.compile(f"[{rare}]+")
    multiple_spaces = re.compile(" {2,}")
    restricted = (multiple_spaces.sub(" ", rare_run.sub(" ", s)).strip() for s in sentences)
    return [s for s in restricted if s]
