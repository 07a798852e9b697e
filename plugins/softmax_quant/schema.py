"""Plugin room, SoftmaxQuantize: the ONNX node contract (op type, domain, version, attributes, I/O dtypes).

Pipeline stage: lowering (``builder.lower.fuse_plugins`` writes these nodes) and engine build.

Inputs (ONNX order): ``x`` [..., N] float32|float16 (rank 1..4), optional additive ``mask`` of the same dtype
that broadcasts to ``x`` by numpy's rules (rank <= x's, e.g. [B, 1, 1, N] or [1, N] for [B, H, S, N]).
Output: ``y`` [..., N] int8 = quantize(softmax(x + mask, axis=-1), scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from calib.errors import GraphError
from plugins.common import DOMAIN, INT8_MAX, PluginAttributes, check_positive_finite

OP_TYPE = "SoftmaxQuantize"
SCHEMA_VERSION = 1
# softmax outputs lie in [0, 1]: 1/127 is a legal static scale that needs no calibration (no range method needed)
DEFAULT_SCALE = 1.0 / INT8_MAX
MAX_RANK = 4


@dataclass(frozen=True, kw_only=True)
class SoftmaxQuantizeAttrs(PluginAttributes):
    """Attributes of one SoftmaxQuantize node, validated at graph-building time."""

    OP_TYPE: ClassVar[str] = OP_TYPE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    scale: float = DEFAULT_SCALE
    has_mask: bool = False
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_positive_finite(f"{OP_TYPE} scale", self.scale)
        self.check_version()

    @property
    def num_inputs(self) -> int:
        return 2 if self.has_mask else 1


ATTRIBUTE_KINDS: dict[str, str] = SoftmaxQuantizeAttrs.attribute_kinds()


def check_mask_shape(x_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    """Raise GraphError unless ``mask_shape`` broadcasts to ``x_shape`` (numpy rules, right-aligned, no
    higher rank): every mask dim is 1 or equal to the input's dim it aligns with."""
    if len(mask_shape) > len(x_shape):
        raise GraphError(f"{OP_TYPE} mask rank {len(mask_shape)} exceeds the input rank {len(x_shape)}")
    offset = len(x_shape) - len(mask_shape)
    for axis, m in enumerate(mask_shape):
        x = x_shape[offset + axis]
        if m not in (1, x):
            raise GraphError(f"{OP_TYPE} mask dim {axis} is {m}; allowed 1 or {x} (the input's aligned dim)")


__all__ = ["ATTRIBUTE_KINDS", "DEFAULT_SCALE", "DOMAIN", "MAX_RANK", "OP_TYPE", "SoftmaxQuantizeAttrs"]
