"""Analysis stage: ``analyze(model) -> GraphReport`` for post-norm encoders and pre-norm decoders.

Layers are found by walking the residual stream, not by parsing node names::

    post-norm (BERT)    h -> [attn branch] -> Add -> LN -> [ffn branch] -> Add -> LN -> h'
                        '--------------------'     '----------------------'
    pre-norm (GPT-2,    x -> [norm -> attn branch] -> Add -> [norm -> ffn branch] -> Add -> x'  ... final norm
              Llama)    '--------------------------'     '-------------------------'            -> lm_head

A residual Add is ``skip + f(skip)`` with a weight GEMM inside ``f``. A branch holding an attention core
(QK^T MatMul -> Softmax -> PV MatMul) opens a new layer; the next branch without one is that layer's FFN
(roles inside a branch: :mod:`builder.graph.blocks`). The norm kind (LayerNorm or RMSNorm) and its place
decide the architecture. Weight GEMMs outside any recognised block keep the generic role ``gemm`` (with a
warning), except the vocabulary projection after the last block (``lm_head``).

Analysis fails up front (GraphError naming the node) on what later stages could not handle: fused ops that
hide the roles (ONNX Runtime transformer-optimized or already quantized graphs) and weights that are not
plain float initializers (weight-only quantized: fold them with :mod:`builder.intake.dequantize`). It reads
initializer shapes and types only, never weight values, so external data need not be loaded.
"""

from __future__ import annotations

import logging

import onnx
from onnx import TensorProto

from builder.graph.blocks import Block, Collector, assign_block, assign_norms
from builder.graph.norms import find_norms
from builder.graph.patterns import (
    AttentionCore,
    Residual,
    find_attention_cores,
    find_residuals,
    find_rotaries,
    opaque_nodes,
    reshape_tail,
)
from builder.graph.report import GraphReport, Role
from builder.graph.topology import GraphIndex
from builder.graph.weights import WeightGemm, WeightKind, find_weight_gemms
from calib.errors import GraphError

logger = logging.getLogger(__name__)

FOLD_HINT = ("fold the weights back to float first with builder.intake.dequantize.fold_weight_dequantization "
             "(they are then re-quantized by the recipe)")


def analyze(model: onnx.ModelProto, name: str = "model") -> GraphReport:
    """Find layers and the role of every recognised node of ``model`` (see the module docstring)."""
    g = GraphIndex.build(model.graph)
    _check_names(g)
    _refuse_opaque(g, name)
    gemms = find_weight_gemms(g)
    _refuse_weights(g, gemms, name)
    if not gemms:
        matmuls = sum(1 for n in g.nodes if n.op_type in ("MatMul", "Gemm"))
        detail = f"its {matmuls} MatMul/Gemm nodes all multiply two activations" if matmuls else "no MatMul/Gemm"
        raise GraphError(f"model {name!r} has no GEMM with a constant weight ({detail}); nothing to quantize")
    gemm_ids = frozenset(w.node for w in gemms)
    cores = find_attention_cores(g, gemm_ids)
    blocks, warnings = _walk_stream(g, find_residuals(g, gemm_ids), cores, gemm_ids)
    out = Collector(g, {})
    by_node = {w.node: w for w in gemms}
    rotaries = find_rotaries(g)
    for block in blocks:
        assign_block(out, block, by_node, rotaries)
    architecture = assign_norms(out, find_norms(g), blocks)
    hidden = _hidden_size(out, by_node)
    after_last = g.descendants([g.nodes[blocks[-1].residual.add].output[0]]) if blocks else frozenset()
    _assign_lm_head(out, gemms, after_last, hidden, frozenset(o.name for o in model.graph.output))
    leftovers = [w for w in gemms if w.node not in out.found]
    for w in leftovers:
        out.gemm(w, Role.GEMM, None)
    num_layers = 1 + max((b.layer for b in blocks), default=-1)
    if num_layers == 0:
        architecture = "unknown"
        warnings.append(
            "no transformer block recognised (no residual Add around a Softmax attention); "
            f"all {len(gemms)} weight GEMMs get the generic role 'gemm'"
        )
    elif architecture == "unknown":
        warnings.append(
            f"{num_layers} transformer blocks found but no LayerNorm or RMSNorm on the residual stream "
            "(another normalization is not recognised); those nodes get no role"
        )
    task_head = [w for w in leftovers if w.node in after_last]
    if task_head:  # a pooler or classifier after the encoder: expected, not a recognition failure
        logger.info("%s: %d weight GEMM(s) after the last block (a task head) get the generic role 'gemm'", name,
                    len(task_head))
    if num_layers and len(leftovers) > len(task_head):
        warnings.append(f"{len(leftovers) - len(task_head)} weight GEMM(s) outside the recognised blocks get the "
                        "generic role 'gemm'")
    for text in warnings:
        logger.warning("%s: %s", name, text)
    heads, kv_heads, head_dim = _attention_geometry(g, out, blocks, by_node, hidden)
    return GraphReport(
        model_name=name, architecture=architecture, num_layers=num_layers, hidden_size=hidden,
        assignments=tuple(out.found[k] for k in sorted(out.found)), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, warnings=tuple(warnings),
    )


def _check_names(g: GraphIndex) -> None:
    names = [n.name for n in g.nodes]
    if "" in names or len(set(names)) != len(names):
        bad = next(f"node #{i} ({n.op_type})" for i, n in enumerate(g.nodes) if not n.name or names.count(n.name) > 1)
        raise GraphError(
            f"{bad} has an empty or duplicate name; later stages key decisions by node name. "
            "Load models with builder.graph.load.load_model, or call builder.graph.load.name_nodes first"
        )


def _refuse_opaque(g: GraphIndex, name: str) -> None:
    found = opaque_nodes(g)
    if found:
        i, why = found[0]
        node = g.nodes[i]
        domain = f"{node.domain}::" if node.domain else ""
        more = f" (and {len(found) - 1} more such nodes)" if len(found) > 1 else ""
        raise GraphError(
            f"model {name!r}: node {node.name!r} ({domain}{node.op_type}) is {why}{more}; analysis needs the "
            "float graph with attention as MatMul/Softmax/MatMul (export with eager attention, without ONNX "
            "Runtime's transformer optimizer or quantizer)"
        )


def _refuse_weights(g: GraphIndex, gemms: tuple[WeightGemm, ...], name: str) -> None:
    for kind in (WeightKind.DEQUANTIZED, WeightKind.COMPUTED):
        bad = [w for w in gemms if w.kind == kind]
        if not bad:
            continue
        w = bad[0]
        chain = " -> ".join(g.nodes[j].op_type for j in w.path)
        more = f" (and {len(bad) - 1} more GEMMs)" if len(bad) > 1 else ""
        node = g.nodes[w.node].name
        if kind == WeightKind.DEQUANTIZED:
            dtype = TensorProto.DataType.Name(g.const_dtype(w.weight) or 0)
            raise GraphError(
                f"model {name!r}: GEMM {node!r}{more} reads a weight-only quantized weight ({dtype} initializer "
                f"{w.weight!r} -> {chain}); {FOLD_HINT}"
            )
        raise GraphError(
            f"model {name!r}: GEMM {node!r}{more} computes its weight from initializer {w.weight!r} through "
            f"{chain}; fold the constant arithmetic into the initializer first (for example with onnxruntime's "
            "graph optimizer or onnxscript's constant folding)"
        )


def _walk_stream(
    g: GraphIndex, residuals: tuple[Residual, ...], cores: tuple[AttentionCore, ...], gemm_ids: frozenset[int]
) -> tuple[list[Block], list[str]]:
    """Order the residual branches along the stream and number the layers."""
    blocks: list[Block] = []
    warnings: list[str] = []
    layer = -1
    previous: Residual | None = None
    for res in sorted(residuals, key=lambda r: r.add):
        core = next((c for c in cores if c.softmax in res.branch_nodes), None)
        if core is not None:
            layer += 1
        elif layer < 0:
            continue  # a GEMM branch before the first attention is not part of a block
        if previous is not None and not _follows(g, previous, res, gemm_ids):
            warnings.append(
                f"residual stream is not a single chain at {g.nodes[res.add].name!r}; layer numbers follow graph order"
            )
        blocks.append(Block(res, layer, core))
        previous = res
    return blocks, warnings


def _follows(g: GraphIndex, previous: Residual, current: Residual, gemm_ids: frozenset[int]) -> bool:
    """``current``'s skip is ``previous``'s output, directly or through GEMM-free nodes (a LayerNorm)."""
    prev_out = g.nodes[previous.add].output[0]
    if current.skip == prev_out:
        return True
    path = g.between(prev_out, current.skip)
    return bool(path) and not path & gemm_ids


def _assign_lm_head(out: Collector, gemms: tuple[WeightGemm, ...], after: frozenset[int], hidden: int | None,
                    outputs: frozenset[str]) -> None:
    """LM_HEAD: a weight GEMM ``after`` the last block, wider than the hidden size, whose output reaches a graph
    output without another weight GEMM (the vocabulary projection, tied to the embedding or not)."""
    if not after or hidden is None:
        return
    g = out.g
    gemm_ids = frozenset(w.node for w in gemms)
    for w in gemms:
        if w.node in out.found or w.node not in after or w.out_features <= hidden:
            continue
        downstream = g.descendants([w.out])
        reaches = w.out in outputs or any(o in outputs for j in downstream for o in g.nodes[j].output)
        if reaches and not downstream & gemm_ids:
            out.gemm(w, Role.LM_HEAD, None)


def _hidden_size(out: Collector, gemms: dict[int, WeightGemm]) -> int | None:
    for anchor, assignment in sorted(out.found.items()):
        if assignment.role in (Role.QKV, Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ) and anchor in gemms:
            return gemms[anchor].in_features
    return None


def _attention_geometry(g: GraphIndex, out: Collector, blocks: list[Block], gemms: dict[int, WeightGemm],
                        hidden: int | None) -> tuple[int | None, int | None, int | None]:
    """(query heads, key/value heads, head dimension) of the first attention block, where the graph tells.

    The head dimension is the last entry of the constant target shape that splits Q into heads
    (``Reshape(q, [b, s, heads | -1, head_dim])``); head counts are projection widths over it.
    """
    block = next((b for b in blocks if b.core is not None), None)
    if block is None or block.core is None:
        return None, None, None
    head_dim = None
    for j in sorted(g.ancestors([block.core.q], block.residual.branch_nodes)):
        if g.nodes[j].op_type == "Reshape":
            _, head_dim = reshape_tail(g, j)
            if head_dim is not None:
                break
    if head_dim is None:
        return None, None, None
    widths = {a.role: gemms[k].out_features for k, a in out.found.items()
              if a.layer == block.layer and k in gemms}
    if Role.QKV in widths and hidden is not None:
        if _heads(hidden, head_dim) is None and head_dim % 3 == 0 and widths[Role.QKV] == 3 * hidden:
            head_dim //= 3  # GPT-NeoX splits the fused QKV per head: Reshape(qkv, [b, s, heads, 3 * head_dim])
        kv_width = (widths[Role.QKV] - hidden) // 2
        return _heads(hidden, head_dim), _heads(kv_width, head_dim), head_dim
    return _heads(widths.get(Role.Q_PROJ), head_dim), _heads(widths.get(Role.K_PROJ), head_dim), head_dim


def _heads(width: int | None, head_dim: int) -> int | None:
    return width // head_dim if width is not None and width > 0 and width % head_dim == 0 else None
