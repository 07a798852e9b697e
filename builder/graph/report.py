"""Analysis stage: the GraphReport artifact (roles of nodes and tensors, layers).

A GraphReport is what every later stage knows about the model's structure: recipes select by role and
layer, the plan places Q/DQ on the tensors named here, the collector observes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from calib.artifact_io import versioned_object

REPORT_VERSION = 1


class Role(StrEnum):
    """What a node does inside a transformer block. Values are the names used in recipes (``role:fc2``)."""

    EMBED_LN = "embed_ln"  # LayerNorm of the embedding sum (BERT) -- layer None
    QKV = "qkv"  # fused Q/K/V projection GEMM
    Q_PROJ = "q_proj"
    K_PROJ = "k_proj"
    V_PROJ = "v_proj"
    ATTN_QK = "attn_qk"  # Q·K^T batched MatMul
    ATTN_SOFTMAX = "attn_softmax"
    ATTN_PV = "attn_pv"  # P·V batched MatMul
    ATTN_OUT = "attn_out"  # attention output projection W_o
    ATTN_RESIDUAL = "attn_residual"  # residual Add after attention
    ATTN_LN = "attn_ln"  # post-LN: LN after the attention residual; pre-LN: LN before attention
    FC1 = "fc1"
    FFN_ACT = "ffn_act"  # GELU/ReLU/SiLU (the node producing the fc2 input)
    FC2 = "fc2"
    FFN_RESIDUAL = "ffn_residual"  # residual Add after the FFN (Bondarenko's y)
    FFN_LN = "ffn_ln"  # post-LN: LN after the FFN residual; pre-LN: LN before the FFN
    FINAL_LN = "final_ln"  # pre-LN models: LN after the last block -- layer None
    GEMM = "gemm"  # a weight GEMM of an unrecognised architecture


@dataclass(frozen=True, kw_only=True)
class RoleAssignment:
    """One node (or one decomposed pattern anchored at a node) with its role and layer."""

    node: str  # anchor node name; for a decomposed LayerNorm the node producing its output
    op_type: str  # ONNX op type of the anchor, or "LayerNorm(decomposed)"
    role: Role
    layer: int | None  # transformer block index from 0; None outside blocks
    inputs: tuple[str, ...]  # activation input tensors (initializers excluded)
    outputs: tuple[str, ...]
    weight: str | None = None  # weight initializer of a GEMM
    weight_axis: int | None = None  # ONNX axis of `weight` that keeps one scale per output channel
    members: tuple[str, ...] = ()  # every node of a decomposed pattern (LayerNorm, GELU)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["role"] = self.role.value
        data["inputs"] = list(self.inputs)
        data["outputs"] = list(self.outputs)
        data["members"] = list(self.members)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoleAssignment:
        return cls(
            node=str(data["node"]),
            op_type=str(data["op_type"]),
            role=Role(data["role"]),
            layer=None if data["layer"] is None else int(data["layer"]),
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            weight=data.get("weight"),
            weight_axis=data.get("weight_axis"),
            members=tuple(data.get("members", ())),
        )


@dataclass(frozen=True, kw_only=True)
class GraphReport:
    """Analysis result: architecture, layers and the role of every recognised node."""

    model_name: str
    architecture: str  # "bert" (post-LN), "gpt" (pre-LN) or "unknown"
    num_layers: int
    hidden_size: int | None
    assignments: tuple[RoleAssignment, ...]
    warnings: tuple[str, ...] = ()
    version: int = field(default=REPORT_VERSION)

    def by_role(self, role: Role) -> tuple[RoleAssignment, ...]:
        """Every assignment with ``role``, in graph order."""
        return tuple(a for a in self.assignments if a.role == role)

    def in_layer(self, layer: int) -> tuple[RoleAssignment, ...]:
        """Every assignment of block ``layer``."""
        return tuple(a for a in self.assignments if a.layer == layer)

    def find(self, role: Role, layer: int | None) -> RoleAssignment | None:
        """The first assignment with ``role`` in ``layer``, if any."""
        return next((a for a in self.assignments if a.role == role and a.layer == layer), None)

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "model_name": self.model_name,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "assignments": [a.to_dict() for a in self.assignments],
            "warnings": list(self.warnings),
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> GraphReport:
        data = versioned_object(text, "GraphReport", REPORT_VERSION)
        return cls(
            model_name=str(data["model_name"]),
            architecture=str(data["architecture"]),
            num_layers=int(data["num_layers"]),
            hidden_size=data["hidden_size"],
            assignments=tuple(RoleAssignment.from_dict(a) for a in data["assignments"]),
            warnings=tuple(data["warnings"]),
        )
