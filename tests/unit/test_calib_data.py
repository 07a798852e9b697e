"""Real-text calibration data: VADER sentences and splits, the Lee corpora, user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calib.data import (
    PASSAGE_CHARS,
    calibration_texts,
    corpus_documents,
    corpus_split,
    lee_background_documents,
    lee_similarity_pairs,
    passages,
    read_texts,
    shakespeare_works,
    vader_movie_sentences,
    vader_splits,
)
from calib.errors import CalibrationError, ConfigError


def test_vader_movie_sentences_filtered_by_rating() -> None:
    sentences = vader_movie_sentences()
    assert len(sentences) == 10_072
    assert all(abs(s.rating) >= 0.5 for s in sentences)
    assert sentences[0].text.startswith("The Rock is destined") and sentences[0].label == 1


def test_missing_sdist_tells_the_user_to_run_make_setup(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="make setup"):
        vader_movie_sentences(tmp_path / "nope.tar.gz")


def test_splits_are_disjoint_deterministic_and_sized() -> None:
    splits = vader_splits(seed=0, calibration=512)
    texts = [{s.text for s in part} for part in (splits.calibration, splits.train, splits.test)]
    assert [len(t) for t in texts] == [512, 5000, len(splits.test)] and len(splits.test) >= 2000
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert vader_splits(seed=0, calibration=512) == splits
    assert vader_splits(seed=1, calibration=512).calibration != splits.calibration
    larger = vader_splits(seed=0, calibration=1024)  # calibration grows from the front: default test untouched
    assert not ({s.text for s in larger.calibration} & texts[2])
    with pytest.raises(ConfigError, match="calibration size"):
        vader_splits(calibration=9000)


def test_lee_pairs_and_background_are_separate() -> None:
    docs, pairs = lee_similarity_pairs()
    assert len(docs) == 50 and len(pairs) == 1225
    assert all(0 <= i < j < 50 and 0.0 <= r <= 1.0 for i, j, r in pairs)
    background = lee_background_documents()
    assert len(background) == 300 and not (set(background) & set(docs))


def test_user_text_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("first line\n\n  second line \n", encoding="utf-8")
    assert read_texts(txt) == ["first line", "second line"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c"])), encoding="utf-8")
    assert sorted(calibration_texts(str(jsonl), samples=5)) == ["a b", "c"]
    jsonl.write_text('{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"t\.jsonl:1: expected an object with a string field 'text'"):
        read_texts(jsonl)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="holds no text"):
        calibration_texts(str(tmp_path / "empty.txt"), samples=5)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))  # not UTF-8: byte 3 is 0xe9
    with pytest.raises(ConfigError, match=r"latin\.txt is not UTF-8 text \(byte 3"):
        read_texts(latin)


def test_unknown_source_suggests_a_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'vader'"):
        calibration_texts("vadr", samples=4)


def test_vader_calibration_texts_are_the_calibration_split() -> None:
    assert calibration_texts("vader", 16) == [s.text for s in vader_splits(0, 16).calibration]


def test_shakespeare_modern_editions_only() -> None:
    works = shakespeare_works()
    names = [name for name, _ in works]
    assert len(works) == 42 and names == sorted(names)  # the folio copies (*_gut_f.txt) are left out
    assert "hamlet" in names and all(not n.endswith("_f") for n in names)
    hamlet = dict(works)["hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


@pytest.mark.parametrize("source", ["lee", "shakespeare"])
def test_corpus_split_is_fixed_contiguous_and_disjoint(source: str) -> None:
    split = corpus_split(source)
    docs = corpus_documents(source)
    held = len(docs) // 4
    assert split.evaluation == tuple(docs[len(docs) - held:]) and split.calibration == tuple(docs[:len(docs) - held])
    assert not set(split.calibration) & set(split.evaluation)
    assert split == corpus_split(source)  # no seed: the same on every call
    assert f"evaluation = the last {held}" in split.rule


def test_language_calibration_texts_come_from_the_calibration_slice() -> None:
    split = corpus_split("shakespeare")
    texts = calibration_texts("shakespeare", 64, seed=3)
    assert len(texts) == 64 and all(len(t) <= PASSAGE_CHARS for t in texts)
    assert all(any(t in doc for doc in split.calibration) for t in texts)
    assert not any(t in doc for t in texts for doc in split.evaluation)
    lee = corpus_split("lee")
    assert set(calibration_texts("lee", 10_000)) <= {p for d in lee.calibration for p in passages(d)}


def test_passages_cut_at_line_ends() -> None:
    doc = "\n".join(f"line {i:03d}" for i in range(100))  # 9 characters per line
    cut = passages(doc, max_chars=50)
    assert "\n".join(cut) == doc and all(len(p) <= 50 for p in cut) and len(cut) == 20
    with pytest.raises(ConfigError, match="not running text"):
        corpus_split("vader")
