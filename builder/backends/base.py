"""Engine-build stage: the backend protocol (``parse``, ``configure``, ``build``, ``serialize``).

A backend turns a Q/DQ ONNX file into serialized engine bytes. The objects passed between the four steps
are the backend's own live handles (TensorRT networks, builder configs); only :class:`TensorSpec` and
the final bytes leave the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx

from builder.backends.options import BackendName, BuildOptions
from calib.schema import Schema


class TensorSpec(Schema, frozen=True, kw_only=True):
    """A network input or output: name, dtype (numpy spelling, e.g. ``float32``) and shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(kw_only=True)
class ParsedNetwork:
    """Live handles of a parsed network (builder, network, parser, logger) and its I/O."""

    builder: Any
    network: Any
    parser: Any
    logger: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    keepalive: list[Any] = field(default_factory=list)  # objects TensorRT only borrows (calibrators)
    # input name -> per axis its profile dimension (builder.backends.dims); empty: axis 0 batch, axis 1 sequence
    dim_roles: dict[str, tuple[str | None, ...]] = field(default_factory=dict)


class EngineBackend(Protocol):
    """What :func:`builder.engine.build.build_engine` needs from a backend."""

    name: BackendName

    def version(self) -> str:
        """Version of the library that builds the engine (recorded in the manifest)."""
        ...

    def targets(self, options: BuildOptions) -> tuple[str, ...]:
        """GPU architectures the engine will run on (``current`` = the building GPU)."""
        ...

    def check(self, model: onnx.ModelProto, options: BuildOptions) -> None:
        """Reject options or graphs this backend cannot build, before any expensive work."""
        ...

    def parse(self, model_path: Path, options: BuildOptions) -> ParsedNetwork: ...

    def configure(self, parsed: ParsedNetwork, options: BuildOptions) -> Any: ...

    def build(self, parsed: ParsedNetwork, config: Any) -> Any: ...

    def serialize(self, built: Any) -> bytes: ...


def plugin_nodes(model: onnx.ModelProto, known_domains: Sequence[str] = ("", "ai.onnx", "ai.onnx.ml")) -> list[str]:
    """Names (or op types) of nodes outside the standard ONNX domains: these need engine plugins."""
    found: list[str] = []
    for node in model.graph.node:
        if node.domain not in known_domains:
            found.append(f"{node.name or '<unnamed>'} ({node.domain}::{node.op_type})")
    return found
