"""Graph intake stage: read an ONNX model from disk and validate it before any expensive work.

Error policy (the CLI's exit codes, calib/errors.py):

- a file that does not exist -- the model itself or an external-data file it references -- is a usage
  error: :class:`ConfigError`, exit 2;
- a file that exists but is not a usable model -- not ONNX, truncated, failing the ONNX checker, external
  data shorter than the model says, or a default-domain opset outside :data:`SUPPORTED_OPSETS` -- is a
  :class:`GraphError`, exit 3.

Every node of a loaded model has a unique, non-empty name (later stages key their decisions by node name).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import onnx
from onnx import external_data_helper

from calib.errors import ConfigError, GraphError, suggest
from calib.onnx_file import read_graph

logger = logging.getLogger(__name__)

MIN_OPSET = 13
MAX_OPSET = 23
SUPPORTED_OPSETS = range(MIN_OPSET, MAX_OPSET + 1)  # default ONNX domain ("" / "ai.onnx")
SMALL_TENSOR_BYTES = 1024  # onnx.save's default size_threshold: larger tensors are weights


def load_model(path: Path, *, weights: bool = True) -> onnx.ModelProto:
    """Load ``path``, check it, and give every node a unique name.

    With ``weights=False`` tensors kept in external data stay references (their files are checked to exist and
    be long enough), except constants of at most :data:`SMALL_TENSOR_BYTES` (shapes, epsilons, exponents),
    which are read: enough for :func:`builder.graph.analyze.analyze`, which reads weight shapes and types
    only, so a model over 2 GB is analyzed without reading its weights.
    """
    path = Path(path)
    _check_file(path)
    model = read_graph(path)
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise GraphError(f"{path} is not an ONNX model: it has no graph nodes (truncated or not ONNX?)")
    check_opset(model, str(path))
    if _check_external_data(model, path.parent, path):
        if weights:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        else:
            _load_small_external_tensors(model, path.parent)
    try:  # by path: the checker parses the file in C++ (external tensors only located, never read) instead of
        # a serialized copy of the in-memory model
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise GraphError(f"{path} fails the ONNX checker: {str(exc).strip().splitlines()[0]}") from exc
    renamed = name_nodes(model)
    if renamed:
        logger.info("named %d unnamed or duplicate nodes in %s", renamed, path)
    return model


def _load_small_external_tensors(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in _all_tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            length = external_data_helper.ExternalDataInfo(tensor).length
            if length is not None and int(length) <= SMALL_TENSOR_BYTES:
                external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"model path {path} is a directory; give the .onnx file inside it")
    if not path.exists():
        siblings = [p.name for p in path.parent.glob("*.onnx")] if path.parent.is_dir() else []
        raise ConfigError(f"model file {path} does not exist{suggest(path.name, siblings)}")
    if path.stat().st_size == 0:
        raise GraphError(f"{path} is empty, not an ONNX model")


def check_opset(model: onnx.ModelProto, where: str = "model") -> int:
    """Return the default-domain opset of ``model``; raise GraphError if it is missing or unsupported."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise GraphError(f"{where} imports no default-domain ONNX opset; supported: {MIN_OPSET}..{MAX_OPSET}")
    opset = int(versions[0])
    if opset not in SUPPORTED_OPSETS:
        hint = "convert it with onnx.version_converter or re-export" if opset < MIN_OPSET else "re-export it"
        raise GraphError(
            f"{where} uses ONNX opset {opset}; supported default-domain opsets are {MIN_OPSET}..{MAX_OPSET} "
            f"({hint} with opset 17)"
        )
    return opset


def _check_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> int:
    """Every external-data file must exist and hold the bytes the model points at; return how many tensors use one."""
    count = 0
    for tensor in _all_tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        count += 1
        info = external_data_helper.ExternalDataInfo(tensor)
        location = base_dir / info.location
        if not location.is_file():
            raise ConfigError(
                f"{path}: tensor {tensor.name!r} keeps its data in {info.location!r}, but {location} does not "
                "exist; copy the data file next to the model"
            )
        if info.length is not None:
            needed = int(info.offset or 0) + int(info.length)
            size = location.stat().st_size
            if size < needed:
                raise GraphError(
                    f"{path}: external data file {location} is truncated ({size} bytes; tensor "
                    f"{tensor.name!r} needs bytes up to {needed})"
                )
    return count


def _all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and its subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                tensors.extend(_all_tensors(sub))
    return tensors


def name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed or duplicate-named nodes of the main graph a unique name, in place; return how many.

    The new name is ``<op_type>_<index>`` (``_<k>`` appended while it collides), so it is deterministic.
    """
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{index}"
        candidate, k = base, 0
        while candidate in taken or candidate in seen:
            k += 1
            candidate = f"{base}_{k}"
        node.name = candidate
        seen.add(candidate)
        taken.add(candidate)
        renamed += 1
    return renamed


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of the deterministic serialization of ``model`` (identity of an in-memory model)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
