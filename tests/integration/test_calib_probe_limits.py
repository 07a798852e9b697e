"""The layout probe on a batch as long as the model's position table: it must not step past the table.

The probe finds each tensor's token axes from a second run at another sequence length. It used to run one token
longer, which a model with 64 positions cannot do at length 64: the probe failed and padding was then counted
in every statistic. It now runs one token shorter.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from calib.collect import CollectOptions, collect
from calib.layout import TensorLayout
from tests.models import model_path


def test_a_batch_at_the_position_limit_is_probed_and_its_padding_excluded(caplog: pytest.LogCaptureFixture) -> None:
    path = model_path("bert-eager")  # max_position_embeddings 64
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 256, size=(4, 64), dtype=np.int64)
    mask = np.ones((4, 64), dtype=np.int64)
    mask[1, 40:] = 0
    mask[3, 9:] = 0
    ids[mask == 0] = 0
    feeds = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:, :30], "attention_mask": mask[:, :30]}]
    hidden = "last_hidden_state"
    with caplog.at_level(logging.WARNING, logger="calib.collect"):
        stats = collect(path, feeds, [hidden], CollectOptions(kinds=("minmax",))).statistics
    assert not [r for r in caplog.records if "probe failed" in r.getMessage()]
    assert stats.meta.layouts[hidden] == TensorLayout(token_axes=(1,))
    # the observed count is the valid tokens' values only: 64 + 40 + 64 + 9 tokens, then 30 + 30 + 30 + 9
    assert stats.tensors[hidden].observers["minmax"].count == (64 + 40 + 64 + 9 + 30 + 30 + 30 + 9) * 64
