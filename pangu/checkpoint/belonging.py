"""Whether a network and what it is put next to belong together: the one place every command asks
(pretrain's resume and train.init_from, evaluate, generate, task scoring), so that none of them
prints a number for a pair that does not belong.

- The tokenizer. A network's token ids mean the pieces of the tokenizer it was trained with and of
  no other: the tokenizer's fingerprint (the sha256 of its SentencePiece model, which meta.json
  and checkpoints record) must be the one the checkpoint records, and its vocabulary the model's.
- The function. A config used with a checkpoint (to resume it, continue from it, evaluate it) must
  compute the same function: every model field but the training-only ones
  (format.TRAINING_ONLY_FIELDS; format.check_model_matches).
- The corpus, for a resume. A run's data position (the sampler state) counts samples of the corpus
  it was trained on (data.prepared.corpus_fingerprint). On another corpus it means nothing, so
  exact resume would silently end: a resume onto another corpus is refused, and the ways on are
  named (the same data; or a new run from the checkpoint's weights, train.init_from, which starts
  its own position; or train.restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import CheckpointError, sha256_file
from pangu.config import ModelConfig
from pangu.data.prepared import corpus_fingerprint, read_meta
from pangu.data.tokenizer import TOKENIZER_FILE, PanguTokenizer


class MismatchError(CheckpointError):
    """A network and the data, tokenizer or config it is used with do not belong together."""


@dataclass(frozen=True)
class TrainedWith:
    """What a network was trained with, as far as it is known: `name` says which network (in
    messages), `tokenizer` and `corpus` are fingerprints (None: not recorded)."""

    name: str
    model: ModelConfig
    tokenizer: str | None = None
    corpus: str | None = None
    checkpoint: Path | None = None

    @classmethod
    def read(cls, path: str | Path) -> TrainedWith:
        """What checkpoint `path` (a checkpoint, checkpoints/ or run directory) records: the
        tokenizer fingerprint of its manifest (else of the tokenizer it carries) and, for a
        training checkpoint, the corpus of its data position."""
        path = fmt.resolve(path)
        manifest = fmt.read_manifest(path)
        tokenizer = manifest.tokenizer_fingerprint
        if tokenizer is None and TOKENIZER_FILE in manifest.files:
            tokenizer = sha256_file(path / TOKENIZER_FILE)
        corpus = None
        if fmt.TRAINER_FILE in manifest.files:
            corpus = fmt.read_trainer_state(path, manifest).corpus_fingerprint
        model = manifest.model
        return cls(f"checkpoint {path}", model, tokenizer, corpus, path)

    def check_config(self, model: ModelConfig, given: str = "the config") -> None:
        """Refuses a model config that computes another function than this network."""
        why = fmt.model_mismatch(self.model, model, given)
        if why is not None:
            raise MismatchError(f"{self.name} was trained with {why}: use the model settings it was trained with")

    def check_tokenizer(self, data: UsedWith) -> None:
        """Refuses a tokenizer (of prepared data, or a file) other than the one this network was
        trained with; without a recorded fingerprint, at least the vocabulary must be the model's."""
        if data.vocab_size != self.model.vocab_size:
            raise MismatchError(
                f"{self.name} has a vocabulary of {self.model.vocab_size} pieces, {data.name} has "
                f"{data.vocab_size}: they do not belong together. Use the tokenizer (and data prepared with "
                f"it) the model was trained with"
            )
        if self.tokenizer is not None and self.tokenizer != data.tokenizer:
            raise MismatchError(
                f"{self.name} was trained with another tokenizer than {data.name} (sha256 "
                f"{self.tokenizer[:12]}... vs {data.tokenizer[:12]}...): its token ids would mean other pieces. "
                f"Use data prepared with the tokenizer it was trained with"
            )

    def check_corpus(self, data: UsedWith) -> None:
        """Refuses to resume a run on another corpus than the one its data position counts in."""
        if self.corpus is not None and data.corpus is not None and self.corpus != data.corpus:
            raise MismatchError(
                f"{self.name} was trained on another corpus than {data.name} holds (other sources, shards or "
                f"blend weights), and a run's data position counts samples of its own corpus. Resume with the "
                f"data it was trained on, or start a new run from its weights with train.init_from="
                f"{self.checkpoint or self.name}"
            )


@dataclass(frozen=True)
class UsedWith:
    """The tokenizer (and corpus) a network is put next to; `name` says whose, in messages."""

    name: str
    tokenizer: str
    vocab_size: int
    corpus: str | None = None

    @classmethod
    def prepared(cls, prepared_dir: str | Path) -> UsedWith:
        """The tokenizer and corpus of a prepared directory (its meta.json)."""
        meta = read_meta(prepared_dir)
        return cls(
            f"the data of data.prepared_dir = {str(prepared_dir)!r}",
            meta.tokenizer.fingerprint,
            meta.vocab_size,
            corpus_fingerprint(meta),
        )

    @classmethod
    def of_tokenizer(cls, tokenizer: PanguTokenizer, name: str) -> UsedWith:
        return cls(name, tokenizer.fingerprint, tokenizer.vocab_size)
