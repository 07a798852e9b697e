"""Fixtures of the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from calib.artifact_io import atomic_write_bytes


@pytest.fixture(scope="module")
def bpe256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-id byte-level BPE trained on Lee's calibration slice (the matrix models' vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calib.data import corpus_split

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # the bytes the corpus uses, then merges up to 256 ids in all (the full byte alphabet alone takes 256)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(corpus_split("lee").calibration, trainer=trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))
    return path
