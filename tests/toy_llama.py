"""Toy Llama-style decoder graphs built in code with ``onnx.helper`` (analysis test support).

``llama_block_model`` builds: token embedding (Gather) -> blocks of [RMSNorm -> Q/K/V projections -> rotary
on Q and K -> grouped-query attention (K/V repeated with Unsqueeze -> Expand -> Reshape) -> W_o -> Add,
RMSNorm -> gate/up -> SiLU(gate) * up -> down -> Add] -> final RMSNorm -> LM head. It runs in ONNX Runtime
with dynamic batch and sequence axes; ``cos`` and ``sin`` [seq, head_dim] are graph inputs (an export
computes them from the positions; analysis only needs them to be activations).

Variants: ``norm`` ``fused`` (ONNX opset-23 ``RMSNormalization``), ``decomposed`` (Pow, ReduceMean, Add,
Sqrt, Div(1, .), Mul, Mul(w): what torch.onnx writes), ``cast`` (Cast to float32 first, Mul(x, x),
Reciprocal, Cast back, then the weight) and ``div`` (x / Sqrt(...)); ``lm_head`` ``transpose`` (tied:
``MatMul(x, Transpose(E))``), ``gemm`` (tied: ``Gemm(x, E, transB=1)``) or ``untied``. Weights are
deterministic; node names are opaque; the ground truth roles are in the metadata (read by :func:`toy_roles`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROLES_KEY = "toy_roles"
NORMS = ("fused", "decomposed", "cast", "div")
LM_HEADS = ("transpose", "gemm", "untied")
EPS = 1e-5


@dataclass
class Toy:
    """Accumulates nodes (in topological order), initializers and ground-truth roles."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    roles: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def op(self, op: str, inputs: list[str], role: tuple[str, int | None] | None = None, **attrs: object) -> str:
        name = f"t{len(self.nodes)}_{op}"
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_y"], name=name, **attrs))
        if role is not None:
            self.roles[name] = role
        return f"{name}_y"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = f"{hint}{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def i64(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def weight(self, k: int, n: int) -> str:
        return self.const((self.rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32), "w")


def _rms(t: Toy, x: str, hidden: int, norm: str, role: tuple[str, int | None]) -> str:
    gamma = t.const((1.0 + 0.1 * t.rng.standard_normal(hidden)).astype(np.float32), "g")
    if norm == "fused":
        return t.op("RMSNormalization", [x, gamma], role, axis=-1, epsilon=EPS)
    if norm == "cast":
        x = t.op("Cast", [x], to=TensorProto.FLOAT)
        square = t.op("Mul", [x, x])
    else:
        square = t.op("Pow", [x, t.f32(2.0)])
    ms = t.op("Add", [t.op("ReduceMean", [square], axes=[-1], keepdims=1), t.f32(EPS)])
    std = t.op("Sqrt", [ms])
    if norm == "div":
        normed = t.op("Div", [x, std])
    elif norm == "cast":
        normed = t.op("Cast", [t.op("Mul", [x, t.op("Reciprocal", [std])])], to=TensorProto.FLOAT)
    else:
        normed = t.op("Mul", [x, t.op("Div", [t.f32(1.0), std])])
    return t.op("Mul", [gamma, normed], role)


def _rotary(t: Toy, x: str, half: int, cos: str, sin: str, layer: int) -> str:
    """x * cos + Concat(-x2, x1) * sin on [batch, heads, seq, head_dim]."""
    x1 = t.op("Slice", [x, t.i64([0]), t.i64([half]), t.i64([-1])])
    x2 = t.op("Slice", [x, t.i64([half]), t.i64([2 * half]), t.i64([-1])])
    rotated = t.op("Concat", [t.op("Neg", [x2]), x1], axis=-1)
    return t.op("Add", [t.op("Mul", [x, cos]), t.op("Mul", [rotated, sin])], ("rotary", layer))


def _heads(t: Toy, x: str, heads: int, head_dim: int) -> str:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    return t.op("Transpose", [t.op("Reshape", [x, t.i64([0, 0, heads, head_dim])])], perm=[0, 2, 1, 3])


def _repeat_kv(t: Toy, x: str, heads: int, kv_heads: int, head_dim: int) -> str:
    """[b, kv, s, d] -> [b, kv, rep, s, d] (Expand) -> [b, heads, s, d], as transformers' repeat_kv exports."""
    if heads == kv_heads:
        return x
    expanded = t.op("Expand", [t.op("Unsqueeze", [x, t.i64([2])]), t.i64([1, 1, heads // kv_heads, 1, 1])])
    return t.op("Reshape", [expanded, t.i64([0, heads, -1, head_dim])])


def _attention(t: Toy, h: str, dims: tuple[int, int, int, int], cos: str, sin: str, layer: int) -> str:
    hidden, heads, kv_heads, head_dim = dims
    q = t.op("MatMul", [h, t.weight(hidden, hidden)], ("q_proj", layer))
    k = t.op("MatMul", [h, t.weight(hidden, kv_heads * head_dim)], ("k_proj", layer))
    v = t.op("MatMul", [h, t.weight(hidden, kv_heads * head_dim)], ("v_proj", layer))
    q = _rotary(t, _heads(t, q, heads, head_dim), head_dim // 2, cos, sin, layer)
    k = _rotary(t, _heads(t, k, kv_heads, head_dim), head_dim // 2, cos, sin, layer)
    k = _repeat_kv(t, k, heads, kv_heads, head_dim)
    v = _repeat_kv(t, _heads(t, v, kv_heads, head_dim), heads, kv_heads, head_dim)
    scores = t.op("MatMul", [q, t.op("Transpose", [k], perm=[0, 1, 3, 2])], ("attn_qk", layer))
    probs = t.op("Softmax", [t.op("Mul", [scores, t.f32(1.0 / math.sqrt(head_dim))])], ("attn_softmax", layer),
                 axis=-1)
    ctx = t.op("MatMul", [probs, v], ("attn_pv", layer))
    merged = t.op("Reshape", [t.op("Transpose", [ctx], perm=[0, 2, 1, 3]), t.i64([0, 0, hidden])])
    return t.op("MatMul", [merged, t.weight(hidden, hidden)], ("attn_out", layer))


def _mlp(t: Toy, h: str, hidden: int, ffn: int, layer: int) -> str:
    gate = t.op("MatMul", [h, t.weight(hidden, ffn)], ("gate_proj", layer))
    up = t.op("MatMul", [h, t.weight(hidden, ffn)], ("up_proj", layer))
    act = t.op("Mul", [t.op("Mul", [gate, t.op("Sigmoid", [gate])]), up], ("ffn_act", layer))
    return t.op("MatMul", [act, t.weight(ffn, hidden)], ("fc2", layer))


def _lm_head(t: Toy, x: str, embedding: str, hidden: int, vocab: int, kind: str) -> str:
    role = ("lm_head", None)
    if kind == "transpose":
        return t.op("MatMul", [x, t.op("Transpose", [embedding], perm=[1, 0])], role)
    if kind == "untied":
        return t.op("MatMul", [x, t.weight(hidden, vocab)], role)
    flat = t.op("Reshape", [x, t.i64([-1, hidden])])
    logits = t.op("Gemm", [flat, embedding], role, transB=1)
    lead = t.op("Slice", [t.op("Shape", [x]), t.i64([0]), t.i64([-1])])
    return t.op("Reshape", [logits, t.op("Concat", [lead, t.i64([vocab])], axis=0)])


def llama_block_model(*, layers: int = 2, norm: str = "decomposed", lm_head: str = "transpose",
                      heads: int = 4, kv_heads: int = 2, seed: int = 0) -> onnx.ModelProto:
    """A Llama-style decoder with hidden 32, FFN 64, vocab 50 and ``heads`` of 8 (see the module docstring)."""
    if norm not in NORMS or lm_head not in LM_HEADS:
        raise ValueError(f"norm must be one of {NORMS} and lm_head one of {LM_HEADS}")
    hidden, ffn, vocab, head_dim = 32, 64, 50, 8
    dims = (hidden, heads, kv_heads, head_dim)
    t = Toy(np.random.default_rng(seed))
    embedding = t.const((0.5 * t.rng.standard_normal((vocab, hidden))).astype(np.float32), "embed")
    x = t.op("Gather", [embedding, "input_ids"])
    for layer in range(layers):
        h = _rms(t, x, hidden, norm, ("attn_ln", layer))
        x = t.op("Add", [x, _attention(t, h, dims, "cos", "sin", layer)], ("attn_residual", layer))
        h = _rms(t, x, hidden, norm, ("ffn_ln", layer))
        x = t.op("Add", [x, _mlp(t, h, hidden, ffn, layer)], ("ffn_residual", layer))
    logits = _lm_head(t, _rms(t, x, hidden, norm, ("final_ln", None)), embedding, hidden, vocab, lm_head)
    t.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["seq", head_dim]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["seq", head_dim])]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])
    graph = helper.make_graph(t.nodes, "toy_llama", inputs, [output], initializer=t.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if norm == "fused" else 17)])
    model.ir_version = 10
    helper.set_model_props(model, {ROLES_KEY: json.dumps(t.roles, sort_keys=True)})
    return model


def toy_roles(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """The ground-truth roles recorded by :func:`llama_block_model` (node name -> (role, layer))."""
    raw = next(p.value for p in model.metadata_props if p.key == ROLES_KEY)
    return {k: (v[0], v[1]) for k, v in json.loads(raw).items()}


def toy_feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    """Token ids and rotary tables (the standard angles: position / 10000^(2i/d))."""
    head_dim = next(d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim if d.dim_value)
    rng = np.random.default_rng(1)
    inv = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    angles = np.outer(np.arange(seq), inv)
    angles = np.concatenate([angles, angles], axis=-1)
    return {"input_ids": rng.integers(0, 50, (batch, seq)).astype(np.int64),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
