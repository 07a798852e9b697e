"""Toy transformer graphs built in code with ``onnx.helper`` (test support for every stage).

``bert_block_model`` builds a post-LN BERT encoder (embeddings + LayerNorm, then blocks of attention -> Add ->
LN -> FFN -> Add -> LN); ``gpt_block_model`` a pre-LN GPT decoder (LN -> attention -> Add, LN -> FFN -> Add,
final LN). Both run in ONNX Runtime with dynamic batch and sequence axes, take int64 ``input_ids`` (ids below
``vocab``; the default matches the MiniLM tokenizer, so real tokenized text can be fed) and output
``last_hidden_state`` [batch, seq, hidden]. The BERT model also takes an int64 ``attention_mask``.

Weights are deterministic (``np.random.default_rng(seed)``). Node names are opaque (``n17_MatMul``) so that
analysis cannot lean on them; the ground truth of every role is stored in the model's metadata under
``toy_roles`` and read back with :func:`toy_roles`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOY_OPSET = 17
ROLES_KEY = "toy_roles"
ACTIVATIONS = ("gelu_erf", "gelu_tanh", "relu")


@dataclass
class _Graph:
    """Accumulates nodes and initializers in topological order."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    roles: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    counter: int = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        name = f"n{len(self.nodes)}_{op}"
        outputs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        return self.node(op, inputs, 1, **attrs)[0]

    def last(self) -> str:
        return self.nodes[-1].name

    def mark(self, role: str, layer: int | None, node: str | None = None) -> None:
        self.roles[node or self.last()] = (role, layer)

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        self.counter += 1
        name = f"{hint}{self.counter}"
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def i64(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        w = self.rng.standard_normal(shape).astype(np.float32) / np.float32(math.sqrt(fan_in))
        return self.const(w, "w")

    def bias(self, size: int) -> str:
        return self.const((0.02 * self.rng.standard_normal(size)).astype(np.float32), "b")


def _linear(g: _Graph, x: str, k: int, n: int, role: str, layer: int | None, gemm: bool = False) -> str:
    """x @ W + b as MatMul + Add (W [K, N]), or as Reshape -> Gemm(transB=1, W [N, K]) -> Reshape."""
    if not gemm:
        y = g.op("MatMul", [x, g.weight((k, n), k)])
        g.mark(role, layer)
        return g.op("Add", [y, g.bias(n)])
    lead = g.op("Slice", [g.op("Shape", [x]), g.i64([0]), g.i64([-1])])
    flat = g.op("Reshape", [x, g.i64([-1, k])])
    y = g.op("Gemm", [flat, g.weight((n, k), k), g.bias(n)], transB=1)
    g.mark(role, layer)
    return g.op("Reshape", [y, g.op("Concat", [lead, g.i64([n])], axis=0)])


def _layer_norm(g: _Graph, x: str, hidden: int, fused: bool, role: str, layer: int | None) -> str:
    gamma = g.const((1.0 + 0.1 * g.rng.standard_normal(hidden)).astype(np.float32), "ln_g")
    beta = g.const((0.05 * g.rng.standard_normal(hidden)).astype(np.float32), "ln_b")
    if fused:
        y = g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
    else:
        mean = g.op("ReduceMean", [x], axes=[-1], keepdims=1)
        d = g.op("Sub", [x, mean])
        var = g.op("ReduceMean", [g.op("Pow", [d, g.f32(2.0)])], axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, g.f32(1e-5)])])
        y = g.op("Add", [g.op("Mul", [g.op("Div", [d, std]), gamma]), beta])
    g.mark(role, layer)
    return y


def _activation(g: _Graph, x: str, kind: str, layer: int) -> str:
    if kind == "relu":
        y = g.op("Relu", [x])
    elif kind == "gelu_erf":  # 0.5 * x * (1 + erf(x / sqrt(2)))
        erf = g.op("Erf", [g.op("Div", [x, g.f32(math.sqrt(2.0))])])
        y = g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, g.f32(1.0)])]), g.f32(0.5)])
    elif kind == "gelu_tanh":  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
        cube = g.op("Mul", [g.op("Pow", [x, g.f32(3.0)]), g.f32(0.044715)])
        inner = g.op("Mul", [g.op("Add", [x, cube]), g.f32(math.sqrt(2.0 / math.pi))])
        half = g.op("Mul", [x, g.f32(0.5)])
        y = g.op("Mul", [half, g.op("Add", [g.op("Tanh", [inner]), g.f32(1.0)])])
    else:
        raise ValueError(f"activation {kind!r} not supported; use one of {ACTIVATIONS}")
    g.mark("ffn_act", layer)
    return y


def _attention(g: _Graph, x: str, mask: str | None, dims: tuple[int, int, int], fused_qkv: bool) -> str:
    """Multi-head self-attention (no residual); ``dims`` = (hidden, heads, layer)."""
    hidden, heads, layer = dims
    head = hidden // heads
    if fused_qkv:
        qkv = _linear(g, x, hidden, 3 * hidden, "qkv", layer)
        q, k, v = g.node("Split", [qkv, g.i64([hidden] * 3)], 3, axis=-1)
    else:
        q = _linear(g, x, hidden, hidden, "q_proj", layer)
        k = _linear(g, x, hidden, hidden, "k_proj", layer)
        v = _linear(g, x, hidden, hidden, "v_proj", layer)
    split_heads = g.i64([0, 0, heads, head])
    q4 = g.op("Transpose", [g.op("Reshape", [q, split_heads])], perm=[0, 2, 1, 3])
    k4t = g.op("Transpose", [g.op("Reshape", [k, split_heads])], perm=[0, 2, 3, 1])
    v4 = g.op("Transpose", [g.op("Reshape", [v, split_heads])], perm=[0, 2, 1, 3])
    scores = g.op("MatMul", [q4, k4t])
    g.mark("attn_qk", layer)
    scores = g.op("Div", [scores, g.f32(math.sqrt(head))])
    if mask is not None:
        scores = g.op("Add", [scores, mask])
    probs = g.op("Softmax", [scores], axis=-1)
    g.mark("attn_softmax", layer)
    ctx = g.op("MatMul", [probs, v4])
    g.mark("attn_pv", layer)
    merged = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.i64([0, 0, hidden])])
    return _linear(g, merged, hidden, hidden, "attn_out", layer)


def _ffn(g: _Graph, x: str, dims: tuple[int, int, int], activation: str, gemm: bool) -> str:
    hidden, ffn, layer = dims
    h = _linear(g, x, hidden, ffn, "fc1", layer, gemm)
    h = _activation(g, h, activation, layer)
    return _linear(g, h, ffn, hidden, "fc2", layer, gemm)


def _embeddings(g: _Graph, vocab: int, hidden: int, max_positions: int) -> str:
    words = g.op("Gather", [g.weight((vocab, hidden), 1), "input_ids"], axis=0)
    seq = g.op("Squeeze", [g.op("Slice", [g.op("Shape", ["input_ids"]), g.i64([1]), g.i64([2])]), g.i64([0])])
    positions = g.op("Range", [g.const(np.array(0, dtype=np.int64)), seq, g.const(np.array(1, dtype=np.int64))])
    pos = g.op("Gather", [g.weight((max_positions, hidden), 1), positions], axis=0)
    return g.op("Add", [words, pos])


def _finish(g: _Graph, name: str, inputs: list[onnx.ValueInfoProto], out: str, hidden: int) -> onnx.ModelProto:
    g.nodes.append(helper.make_node("Identity", [out], ["last_hidden_state"], name=f"n{len(g.nodes)}_Identity"))
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(g.nodes, name, inputs, [output], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TOY_OPSET)], producer_name="toygraphs")
    model.ir_version = 8
    helper.set_model_props(model, {ROLES_KEY: json.dumps(g.roles, sort_keys=True)})
    onnx.checker.check_model(model)
    return model


def _ids_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def bert_block_model(  # noqa: PLR0913 -- one flag per toy-graph variant
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    ffn: int = 64,
    fused_ln: bool = True,
    fused_qkv: bool = False,
    activation: str = "gelu_erf",
    vocab: int = 30522,
    seed: int = 0,
) -> onnx.ModelProto:
    """Post-LN BERT encoder: inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq])."""
    g = _Graph(np.random.default_rng(seed))
    emb = _embeddings(g, vocab, hidden, 512)
    x = _layer_norm(g, emb, hidden, fused_ln, "embed_ln", None)
    # additive mask [batch, 1, 1, seq]: 0 where attended, -10000 where padded
    keep = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Mul", [g.op("Sub", [g.f32(1.0), keep]), g.f32(-10000.0)])
    mask = g.op("Unsqueeze", [mask, g.i64([1, 2])])
    for layer in range(layers):
        attn = _attention(g, x, mask, (hidden, heads, layer), fused_qkv)
        x = g.op("Add", [attn, x])
        g.mark("attn_residual", layer)
        x = _layer_norm(g, x, hidden, fused_ln, "attn_ln", layer)
        y = _ffn(g, x, (hidden, ffn, layer), activation, gemm=False)
        x = g.op("Add", [y, x])
        g.mark("ffn_residual", layer)
        x = _layer_norm(g, x, hidden, fused_ln, "ffn_ln", layer)
    return _finish(g, "toy_bert", [_ids_input("input_ids"), _ids_input("attention_mask")], x, hidden)


def gpt_block_model(  # noqa: PLR0913 -- one flag per toy-graph variant
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    ffn: int = 64,
    fused_ln: bool = True,
    fused_qkv: bool = True,
    causal: bool = True,
    activation: str = "gelu_tanh",
    gemm_ffn: bool = False,
    vocab: int = 30522,
    seed: int = 0,
) -> onnx.ModelProto:
    """Pre-LN GPT decoder with a final LayerNorm: input ``input_ids`` (int64 [batch, seq]).

    ``gemm_ffn`` writes fc1/fc2 as ``Gemm(transB=1)`` on the flattened tokens instead of MatMul + Add.
    """
    g = _Graph(np.random.default_rng(seed))
    x = _embeddings(g, vocab, hidden, 512)
    mask = None
    if causal:  # -10000 above the diagonal, [seq, seq]
        seq = g.op("Slice", [g.op("Shape", ["input_ids"]), g.i64([1]), g.i64([2])])
        ones = g.op("ConstantOfShape", [g.op("Concat", [seq, seq], axis=0)], value=helper.make_tensor(
            "one", TensorProto.FLOAT, [1], [1.0]))
        upper = g.op("Trilu", [ones, g.const(np.array(1, dtype=np.int64))], upper=1)
        mask = g.op("Mul", [upper, g.f32(-10000.0)])
    for layer in range(layers):
        a = _layer_norm(g, x, hidden, fused_ln, "attn_ln", layer)
        x = g.op("Add", [x, _attention(g, a, mask, (hidden, heads, layer), fused_qkv)])
        g.mark("attn_residual", layer)
        f = _layer_norm(g, x, hidden, fused_ln, "ffn_ln", layer)
        x = g.op("Add", [x, _ffn(g, f, (hidden, ffn, layer), activation, gemm_ffn)])
        g.mark("ffn_residual", layer)
    x = _layer_norm(g, x, hidden, fused_ln, "final_ln", None)
    return _finish(g, "toy_gpt", [_ids_input("input_ids")], x, hidden)


def mlp_model(hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Not a transformer: two MatMul + Relu layers on a float input ``x`` [batch, hidden]."""
    g = _Graph(np.random.default_rng(seed))
    h = g.op("Relu", [_linear(g, "x", hidden, hidden, "gemm", None)])
    y = _linear(g, h, hidden, hidden, "gemm", None)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])
    g.nodes.append(helper.make_node("Identity", [y], ["y"], name=f"n{len(g.nodes)}_Identity"))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])
    graph = helper.make_graph(g.nodes, "toy_mlp", [x_in], [out], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TOY_OPSET)], producer_name="toygraphs")
    model.ir_version = 8
    helper.set_model_props(model, {ROLES_KEY: json.dumps(g.roles, sort_keys=True)})
    return model


def toy_roles(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """Ground truth written by the builders: anchor node name -> (role value, layer)."""
    props = {p.key: p.value for p in model.metadata_props}
    return {node: (role, layer) for node, (role, layer) in json.loads(props[ROLES_KEY]).items()}


def toy_feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Input feeds for running a toy model (ids below 1000; the second row is padded when there is a mask).

    For shape and equivalence checks only: calibration always uses real text (see ``calib``'s data sources).
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(1, 1000, size=(batch, seq), dtype=np.int64)
        elif value.name == "attention_mask":
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[1:, seq // 2 :] = 0
            feeds[value.name] = mask
        else:
            dim = value.type.tensor_type.shape.dim[-1].dim_value
            feeds[value.name] = rng.standard_normal((batch, dim)).astype(np.float32)
    return feeds
