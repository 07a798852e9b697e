"""Evaluation stage (shared with calibration and the pipeline): the checked text encoder for any model.

:func:`model_text_encoder` is the one entry point: model (path or ModelProto), optional ``--tokenizer`` and
optional ``--input-map`` in, a :class:`calib.text_encoder.TextEncoder` out, checked against the model's
embedding table before anything runs. It adds one rule to :func:`calib.text_encoder.open_text_encoder`:
the bundled MiniLM tokenizer is used for the bundled MiniLM export only -- recognised by the path the intake
returns or by the SHA-256 of the exported file (so a copy of the export is recognised too; a quantized
derivative is recognised through its FP32 reference) -- never as a default for other models.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from calib.artifact_io import sha256_file
from calib.errors import BackendUnavailable
from calib.text_encoder import TextEncoder, open_text_encoder

logger = logging.getLogger(__name__)

ModelRef = Path | onnx.ModelProto


def _bundled_export() -> Path | None:
    """The cached MiniLM export of the installed package, when the package and the export exist."""
    from builder.intake.minilm import minilm_onnx_cache_path

    try:
        path = minilm_onnx_cache_path()
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def model_sha256(model: ModelRef) -> str:
    """SHA-256 of the model file, or of the serialized ModelProto (equal for a model loaded from a file)."""
    if isinstance(model, onnx.ModelProto):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    return sha256_file(Path(model))


def is_bundled_minilm(model: ModelRef) -> bool:
    """True for the bundled MiniLM export: the intake's own path, or a file or ModelProto of the same bytes."""
    bundled = _bundled_export()
    if bundled is None:
        return False
    size = bundled.stat().st_size
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() != size:
            return False
    else:
        path = Path(model)
        if not path.is_file():
            return False
        if path.resolve() == bundled.resolve():
            return True
        if path.stat().st_size != size:
            return False
    return model_sha256(model) == sha256_file(bundled)


def bundled_tokenizer_for(models: Sequence[ModelRef]) -> Path | None:
    """The bundled tokenizer.json when one of ``models`` is the bundled MiniLM export, else None."""
    if not any(is_bundled_minilm(m) for m in models):
        return None
    from builder.intake.minilm import tokenizer_json_path

    try:
        return tokenizer_json_path()
    except BackendUnavailable:
        return None


def _position_rows(model: ModelRef) -> int | None:
    """Rows of the model's position-embedding table (its longest sequence), when the graph shows one."""
    from builder.engine.validate import position_table_rows

    graph = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    found = position_table_rows(graph)
    return None if found is None else found[1]


def model_text_encoder(
    model: ModelRef,
    tokenizer: Path | None = None,
    input_map: Mapping[str, str] | None = None,
    *,
    reference: ModelRef | None = None,
) -> TextEncoder:
    """The checked text encoder for ``model`` (and its FP32 ``reference``, which must take the same ids).

    Tokenizer search: ``tokenizer`` if given; next to ``model``, then next to ``reference`` (when paths);
    the bundled MiniLM tokenizer when either is the bundled export; else ConfigError naming where it looked
    and ``--tokenizer``. The vocabulary is checked against the embedding table of both models.
    """
    others = [reference] if reference is not None else []
    paths = [Path(m) for m in others if not isinstance(m, onnx.ModelProto)]
    known = None if tokenizer is not None else bundled_tokenizer_for([model, *others])
    encoder = open_text_encoder(model, tokenizer, input_map, model_paths=paths, known_tokenizer=known)
    encoder.max_positions = _position_rows(model)
    if reference is not None:
        # the reference is run on the same feeds: same inputs by role, same embedding table
        open_text_encoder(reference, encoder.info.tokenizer.path, input_map)
    return encoder
