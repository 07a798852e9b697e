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


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """A network input or output: name, dtype (numpy spelling, e.g. ``float32``) and shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(int(d) for d in data["shape"]))


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
