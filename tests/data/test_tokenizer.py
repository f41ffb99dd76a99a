"""The PanGu tokenizer: the released model's special ids, lossless round trips, and trained
tokenizers that keep the released special ids."""

import hashlib
import pickle
import unicodedata

import pytest

from pangu.data import DataError
from pangu.data.sources import review_files
from pangu.data.tokenizer import PanguTokenizer, presegment
from tests.helpers import RELEASE

RELEASED_MODEL = RELEASE / "vocab.model"
RELEASED_SPECIAL_PIECES = ["<unk>", "<s>", "</s>", "▃", "▂", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>"]
# Chinese with full-width punctuation, ASCII words, runs of spaces and newlines
MIXED_TEXT = "今天北京的天气很好，我们去 Hello World  公园散步。\n第二行：PanGu-α 有 200B 参数！\n\n结束"


@pytest.fixture(scope="module")
def released() -> PanguTokenizer:
    return PanguTokenizer.from_file(RELEASED_MODEL)


@pytest.fixture(scope="module")
def review_lines() -> list[str]:
    positive = next(path for path, label in review_files().items() if label == "positive")
    return positive.read_text(encoding="utf-8").splitlines()[:300]


def test_released_model_special_ids(released):
    assert released.vocab_size == 40000
    assert (released.unk_id, released.pad_id, released.eod_id) == (0, 6, 9)
    assert [released.id_to_piece(i) for i in range(10)] == RELEASED_SPECIAL_PIECES
    assert released.fingerprint == hashlib.sha256(RELEASED_MODEL.read_bytes()).hexdigest()


def test_presegmentation_is_jieba_words_joined_by_spaces():
    assert presegment("我爱北京天安门") == "我 爱 北京 天安门"
    assert presegment("你好 世界\n再见") == "你好 ▂ 世界 ▃ 再见"


def test_released_round_trip_keeps_spaces_and_newlines(released):
    ids = released.encode(MIXED_TEXT)
    assert 3 in ids and 4 in ids  # the newline and space symbols
    assert released.unk_id not in ids
    # the released model normalises with NFKC: full-width punctuation comes back half-width
    assert released.decode(ids) == unicodedata.normalize("NFKC", MIXED_TEXT)
    assert released.encode_batch([MIXED_TEXT, "再见"]) == [ids, released.encode("再见")]


def test_literal_special_token_text_is_not_a_special_id(released):
    # jieba splits "<eot>" into "<", "eot", ">", so text can never inject a document separator
    assert released.eod_id not in released.encode("文本里有<eot>字样")


def test_tokenizer_survives_pickling_for_worker_processes(released):
    clone = pickle.loads(pickle.dumps(released))
    assert clone.encode(MIXED_TEXT) == released.encode(MIXED_TEXT)
    assert clone.fingerprint == released.fingerprint


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.model.*does not exist"):
        PanguTokenizer.from_file(tmp_path / "nope.model")


@pytest.mark.parametrize("algorithm", ["bpe", "unigram"])
def test_trained_tokenizer_keeps_released_special_ids_and_round_trips(tmp_path, review_lines, algorithm):
    out = tmp_path / "tok.model"
    trained = PanguTokenizer.train(review_lines, out, vocab_size=500, algorithm=algorithm)
    assert out.is_file() and not list(tmp_path.glob("*.tmp"))
    assert PanguTokenizer.from_file(out).fingerprint == trained.fingerprint
    assert trained.vocab_size == 500
    assert [trained.id_to_piece(i) for i in range(10)] == RELEASED_SPECIAL_PIECES
    assert (trained.unk_id, trained.pad_id, trained.eod_id) == (0, 6, 9)
    # byte fallback: characters never seen in training (龘) still round-trip, no <unk>
    text = MIXED_TEXT + " 龘"
    ids = trained.encode(text)
    assert trained.unk_id not in ids
    assert trained.decode(ids) == unicodedata.normalize("NFKC", text)
    # it learned something: frequent review words are single pieces
    assert len(trained.encode("不错")) < len("不错".encode())


def test_training_rejects_a_vocabulary_too_small_for_the_special_and_byte_pieces(tmp_path, review_lines):
    with pytest.raises(DataError, match="vocab_size = 200 is too small"):
        PanguTokenizer.train(review_lines, tmp_path / "tok.model", vocab_size=200)
    assert not (tmp_path / "tok.model").exists()


def test_text_never_ends_in_half_a_character(tmp_path, review_lines):
    """A sample cut after the first bytes of a byte-fallback character (generation stops at
    max_new_tokens anywhere) decodes without them, not to U+FFFD: every prefix of the ids decodes
    to a prefix of the text."""
    trained = PanguTokenizer.train(review_lines, tmp_path / "tok.model", vocab_size=400)
    text = "好龘𠀋é不错"  # 3- and 4-byte characters never seen in training, a 2-byte one, then known ones
    ids = trained.encode(text)
    assert sum(trained._sp.is_byte(i) for i in ids) >= 7
    for end in range(len(ids) + 1):
        decoded = trained.decode(ids[:end])
        assert "\ufffd" not in decoded and text.startswith(decoded), (end, decoded)
    assert trained.decode(ids) == text
    assert {trained.decode(ids[:end]) for end in range(len(ids) + 1)} >= {"好", "好龘", "好龘𠀋", "好龘𠀋é"}


# A tokenizer training that SentencePiece spends a while on (~10 s here): 600k lines of words
# drawn from a random lexicon, already segmented (presegment bypassed), a large vocabulary.
# SIGTERM comes 2 s after SentencePiece started (its alphabet is restricted just before).
INTERRUPTED_TRAINING = """
import os, random, signal, sys, threading, time
import multiprocessing
import pangu.data.tokenizer as tokenizer
tokenizer.presegment = lambda text: text
restrict = tokenizer._restrict_alphabet
def restrict_then_signal(*args, **kwargs):
    restricted = restrict(*args, **kwargs)
    def later():
        time.sleep(2)
        print(f"signal {time.monotonic()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=later, daemon=True).start()
    return restricted
tokenizer._restrict_alphabet = restrict_then_signal
signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
rng = random.Random(0)
characters = [chr(0x4E00 + i) for i in range(3000)]
words = ["".join(rng.choices(characters, k=rng.randint(2, 4))) for _ in range(50000)]
lines = [" ".join(rng.choices(words, k=30)) for _ in range(600000)]
try:
    tokenizer.PanguTokenizer.train(lines, sys.argv[1], 60000, "bpe", num_threads=1)
    print("trained", file=sys.stderr)
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic()}", file=sys.stderr)
    print(f"processes left: {len(multiprocessing.active_children())}", file=sys.stderr)
"""


@pytest.mark.slow
def test_ctrl_c_or_sigterm_ends_a_long_tokenizer_training_at_once(tmp_path):
    """SentencePiece trains in C++, deaf to signals, for minutes on a real sample: it runs in a
    process of its own, so the signal ends the training within a second, leaving no process and
    no model file."""
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    out = tmp_path / "tokenizer.model"
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_TRAINING, str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    times = dict(line.split() for line in done.stderr.splitlines() if line.startswith(("signal ", "interrupted ")))
    assert "trained" not in done.stderr and set(times) == {"signal", "interrupted"}, done.stderr[-2000:]
    assert float(times["interrupted"]) - float(times["signal"]) < 1.5
    assert "processes left: 0" in done.stderr and not out.exists()
