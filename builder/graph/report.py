"""Analysis stage: the GraphReport artifact (roles of nodes and tensors, layers, attention geometry).

A GraphReport is what every later stage knows about the model's structure: recipes select by role and
layer, the plan places Q/DQ on the tensors named here, the collector observes them. It is a frozen,
versioned msgspec Schema; decoding rejects unknown keys and a different ``version``.

``architecture`` values (decided from the graph, never from names):

- ``"bert"``: post-norm encoder (a LayerNorm on each residual Add's output: BERT, RoBERTa, DistilBERT);
- ``"gpt"``: pre-norm with LayerNorm inside each branch and a final LayerNorm (GPT-2 style);
- ``"llama"``: pre-norm with RMSNorm (Llama style: SmolLM2, Mistral, Qwen2; usually rotary embeddings,
  grouped-query attention and a gated MLP);
- ``"unknown"``: no transformer block, or blocks without a recognised normalization.

``pre_norm`` is true for ``gpt`` and ``llama``: there the residual stream lives in the residual sums, in
post-norm models in the norm outputs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from calib.schema import Schema, decode_json, to_json

REPORT_VERSION = 2

Architecture = Literal["bert", "gpt", "llama", "unknown"]
PRE_NORM_ARCHITECTURES: frozenset[str] = frozenset({"gpt", "llama"})


class Role(StrEnum):
    """What a node does inside a transformer block. Values are the names used in recipes (``role:fc2``)."""

    EMBED_LN = "embed_ln"  # LayerNorm of the embedding sum (BERT) -- layer None
    QKV = "qkv"  # fused Q/K/V projection GEMM
    Q_PROJ = "q_proj"
    K_PROJ = "k_proj"
    V_PROJ = "v_proj"
    ROTARY = "rotary"  # rotary position embedding applied to Q or K (elementwise; never quantized)
    ATTN_QK = "attn_qk"  # Q·K^T batched MatMul
    ATTN_SOFTMAX = "attn_softmax"
    ATTN_PV = "attn_pv"  # P·V batched MatMul
    ATTN_OUT = "attn_out"  # attention output projection W_o
    ATTN_RESIDUAL = "attn_residual"  # residual Add after attention
    ATTN_LN = "attn_ln"  # post-LN: norm after the attention residual; pre-LN: norm before attention
    FC1 = "fc1"  # first FFN GEMM of a plain (ungated) MLP
    GATE_PROJ = "gate_proj"  # gated MLP: the GEMM whose output goes through the activation (SiLU(gate))
    UP_PROJ = "up_proj"  # gated MLP: the GEMM multiplied with the activated gate
    FFN_ACT = "ffn_act"  # GELU/ReLU/SiLU, or SiLU(gate)*up of a gated MLP (the node producing the fc2 input)
    FC2 = "fc2"  # last FFN GEMM (the down projection of a gated MLP)
    FFN_RESIDUAL = "ffn_residual"  # residual Add after the FFN (Bondarenko's y)
    FFN_LN = "ffn_ln"  # post-LN: norm after the FFN residual; pre-LN: norm before the FFN
    FINAL_LN = "final_ln"  # pre-LN models: norm after the last block -- layer None
    LM_HEAD = "lm_head"  # GEMM after the last block producing the vocabulary logits -- layer None
    GEMM = "gemm"  # a weight GEMM of an unrecognised architecture

Operand = Literal["q", "k", "p", "v"]


class RoleAssignment(Schema, frozen=True, kw_only=True):
    """One node (or one decomposed pattern anchored at a node) with its role and layer.

    For the norm roles ``op_type`` tells the kind: ``LayerNormalization`` / ``LayerNorm(decomposed)`` or
    ``RMSNormalization`` / ``RMSNorm(decomposed)``.

    Weight sharing (GEMM roles): ``weight_path`` lists the nodes between the initializer and the GEMM (a
    Transpose of a tied embedding, in order from the initializer), ``weight_shared_with`` every other node
    that reads the same initializer (directly or through its own path: another GEMM, the embedding Gather).
    A plan that quantizes such a weight must quantize it once for all its readers, or keep it float.
    """

    node: str  # anchor node name; for a decomposed pattern the node producing its output
    op_type: str  # ONNX op type of the anchor, or "<Kind>(decomposed)"
    role: Role
    layer: int | None  # transformer block index from 0; None outside blocks
    inputs: tuple[str, ...]  # activation input tensors (initializers excluded)
    outputs: tuple[str, ...]
    weight: str | None = None  # weight initializer of a GEMM
    weight_axis: int | None = None  # ONNX axis of `weight` that keeps one scale per output channel
    weight_path: tuple[str, ...] = ()  # nodes from `weight` to the GEMM (e.g. a Transpose)
    weight_shared_with: tuple[str, ...] = ()  # other nodes reading `weight`
    members: tuple[str, ...] = ()  # every node of a decomposed pattern (LayerNorm, RMSNorm, GELU, rotary)
    operands: tuple[Operand, ...] = ()  # ATTN_QK / ATTN_PV: "q","k" / "p","v", aligned with `inputs`


class GraphReport(Schema, frozen=True, kw_only=True):
    """Analysis result: architecture, layers, attention geometry and the role of every recognised node."""

    model_name: str
    architecture: Architecture  # see the module docstring
    num_layers: int
    hidden_size: int | None
    assignments: tuple[RoleAssignment, ...]
    num_heads: int | None = None  # query heads (from the projection widths and the head dimension)
    num_kv_heads: int | None = None  # key/value heads; fewer than num_heads under grouped-query attention
    head_dim: int | None = None
    warnings: tuple[str, ...] = ()
    version: int = REPORT_VERSION

    @property
    def pre_norm(self) -> bool:
        """True for pre-norm models (``gpt``, ``llama``): the residual stream is in the residual sums."""
        return self.architecture in PRE_NORM_ARCHITECTURES

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
        """Canonical JSON (sorted keys); :meth:`from_json` reads it back equal."""
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> GraphReport:
        """Decode a GraphReport; a wrong version, an unknown key or a bad value raises ConfigError."""
        return decode_json(text, cls, "GraphReport", version=REPORT_VERSION)
