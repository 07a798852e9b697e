"""Shared pytest fixtures: the real MiniLM export (cached) and common paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    """The all-MiniLM-L6-v2 ONNX export (exported once, then read from the cache)."""
    from builder.intake.minilm import ensure_minilm_onnx

    return ensure_minilm_onnx()
