"""Analysis stage: ``analyze(model) -> GraphReport`` for BERT-style (post-LN) and GPT-style (pre-LN) graphs.

Layers are found by walking the residual stream, not by parsing node names::

    post-LN (BERT)   h -> [attn branch] -> Add -> LN -> [ffn branch] -> Add -> LN -> h'
                     '--------------------'     '----------------------'
    pre-LN  (GPT)    x -> [LN -> attn branch] -> Add -> [LN -> ffn branch] -> Add -> x'   ... final LN
                     '------------------------'     '-----------------------'

A residual Add is ``skip + f(skip)`` with a weight GEMM inside ``f``. A branch holding an attention core
(QK^T MatMul -> Softmax -> PV MatMul) opens a new layer; the next branch without one is that layer's FFN.
Inside the attention branch, projections are told apart by which of Q, K^T and V they feed; inside the FFN
branch, fc2 is the GEMM that feeds the residual and fc1 every GEMM feeding another. Weight GEMMs outside any
recognised block keep the generic role ``gemm`` (with a warning), so unknown architectures still get roles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from builder.graph.patterns import (
    LAYOUT_OPS,
    AttentionCore,
    LayerNormMatch,
    Residual,
    WeightGemm,
    find_attention_cores,
    find_layer_norms,
    find_residuals,
    find_weight_gemms,
)
from builder.graph.report import GraphReport, Role, RoleAssignment
from builder.graph.topology import GraphIndex
from calib.errors import GraphError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Block:
    """One residual branch on the stream: attention (``core`` set) or FFN."""

    residual: Residual
    layer: int
    core: AttentionCore | None


@dataclass
class _Collector:
    """Mutable scratch state of one analysis: anchor node id -> assignment."""

    g: GraphIndex
    found: dict[int, RoleAssignment]

    def add(
        self,
        anchor: int,
        role: Role,
        layer: int | None,
        *,
        inputs: tuple[str, ...] | None = None,
        members: tuple[int, ...] = (),
        op_type: str | None = None,
        weight: str | None = None,
        weight_axis: int | None = None,
    ) -> None:
        node = self.g.nodes[anchor]
        if inputs is None:
            inputs = tuple(t for t in node.input if t and not self.g.is_const(t))
        self.found[anchor] = RoleAssignment(
            node=node.name,
            op_type=op_type or node.op_type,
            role=role,
            layer=layer,
            inputs=inputs,
            outputs=tuple(t for t in node.output if t),
            weight=weight,
            weight_axis=weight_axis,
            members=tuple(self.g.nodes[m].name for m in members),
        )

    def gemm(self, gemm: WeightGemm, role: Role, layer: int | None) -> None:
        self.add(gemm.node, role, layer, inputs=(gemm.x,), weight=gemm.weight, weight_axis=gemm.weight_axis)


def analyze(model: onnx.ModelProto, name: str = "model") -> GraphReport:
    """Find layers and the role of every recognised node of ``model`` (see the module docstring)."""
    g = GraphIndex.build(model.graph)
    _check_names(g)
    gemms = find_weight_gemms(g)
    if not gemms:
        matmuls = sum(1 for n in g.nodes if n.op_type in ("MatMul", "Gemm"))
        detail = f"its {matmuls} MatMul/Gemm nodes all multiply two activations" if matmuls else "no MatMul/Gemm"
        raise GraphError(f"model {name!r} has no GEMM with a constant weight ({detail}); nothing to quantize")
    gemm_ids = frozenset(w.node for w in gemms)
    cores = find_attention_cores(g, gemm_ids)
    blocks, warnings = _walk_stream(g, find_residuals(g, gemm_ids), cores, gemm_ids)
    out = _Collector(g, {})
    by_node = {w.node: w for w in gemms}
    for block in blocks:
        _assign_block(out, block, by_node)
    architecture = _assign_layer_norms(out, find_layer_norms(g), blocks)
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
            f"{num_layers} transformer blocks found but no LayerNorm on the residual stream "
            "(RMSNorm or another normalization is not recognised); those nodes get no role"
        )
    if num_layers and leftovers:
        warnings.append(f"{len(leftovers)} weight GEMM(s) outside the recognised blocks get the generic role 'gemm'")
    for text in warnings:
        logger.warning("%s: %s", name, text)
    return GraphReport(
        model_name=name,
        architecture=architecture,
        num_layers=num_layers,
        hidden_size=_hidden_size(out, by_node),
        assignments=tuple(out.found[k] for k in sorted(out.found)),
        warnings=tuple(warnings),
    )


def _check_names(g: GraphIndex) -> None:
    names = [n.name for n in g.nodes]
    if "" in names or len(set(names)) != len(names):
        bad = next(f"node #{i} ({n.op_type})" for i, n in enumerate(g.nodes) if not n.name or names.count(n.name) > 1)
        raise GraphError(
            f"{bad} has an empty or duplicate name; later stages key decisions by node name. "
            "Load models with builder.graph.load.load_model, or call builder.graph.load.name_nodes first"
        )


def _walk_stream(
    g: GraphIndex, residuals: tuple[Residual, ...], cores: tuple[AttentionCore, ...], gemm_ids: frozenset[int]
) -> tuple[list[_Block], list[str]]:
    """Order the residual branches along the stream and number the layers."""
    blocks: list[_Block] = []
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
        blocks.append(_Block(res, layer, core))
        previous = res
    return blocks, warnings


def _follows(g: GraphIndex, previous: Residual, current: Residual, gemm_ids: frozenset[int]) -> bool:
    """``current``'s skip is ``previous``'s output, directly or through GEMM-free nodes (a LayerNorm)."""
    prev_out = g.nodes[previous.add].output[0]
    if current.skip == prev_out:
        return True
    path = g.between(prev_out, current.skip)
    return bool(path) and not path & gemm_ids


def _assign_block(out: _Collector, block: _Block, gemms: dict[int, WeightGemm]) -> None:
    g, res, layer = out.g, block.residual, block.layer
    inside = [gemms[i] for i in sorted(res.branch_nodes & frozenset(gemms))]
    if block.core is not None:
        core = block.core
        out.add(core.qk, Role.ATTN_QK, layer)
        out.add(core.softmax, Role.ATTN_SOFTMAX, layer)
        out.add(core.pv, Role.ATTN_PV, layer)
        out.add(res.add, Role.ATTN_RESIDUAL, layer)
        feeds = {
            "q": g.ancestors([core.q], res.branch_nodes),
            "k": g.ancestors([core.k], res.branch_nodes),
            "v": g.ancestors([core.v], res.branch_nodes),
        }
        after_pv = g.descendants([g.nodes[core.pv].output[0]], res.branch_nodes)
        single = {"q": Role.Q_PROJ, "k": Role.K_PROJ, "v": Role.V_PROJ}
        for w in inside:
            hits = [key for key, nodes in feeds.items() if w.node in nodes]
            if len(hits) > 1:
                out.gemm(w, Role.QKV, layer)
            elif hits:
                out.gemm(w, single[hits[0]], layer)
            elif w.node in after_pv:
                out.gemm(w, Role.ATTN_OUT, layer)
        return
    out.add(res.add, Role.FFN_RESIDUAL, layer)
    inside_ids = frozenset(w.node for w in inside)
    fc1 = [w for w in inside if g.descendants([w.out], res.branch_nodes) & inside_ids]
    fc2 = [w for w in inside if w not in fc1]
    for w in fc1:
        out.gemm(w, Role.FC1, layer)
    for w in fc2:
        out.gemm(w, Role.FC2, layer)
        _assign_activation(out, w, fc1, block)


def _assign_activation(out: _Collector, fc2: WeightGemm, fc1: list[WeightGemm], block: _Block) -> None:
    """FFN_ACT: the nodes between the fc1 outputs and fc2's input; anchor = the last non-layout one."""
    g = out.g
    fc1_nodes = {w.node for w in fc1} | {w.bias_add for w in fc1 if w.bias_add is not None}
    sources = [w.out for w in fc1]
    members = g.descendants(sources, block.residual.branch_nodes) & g.ancestors([fc2.x]) - fc1_nodes
    anchor = g.producer_of(fc2.x)
    while anchor is not None and anchor in members and g.nodes[anchor].op_type in LAYOUT_OPS:
        anchor = g.producer_of(g.nodes[anchor].input[0])
    if anchor is None or anchor not in members:
        return
    ops = {g.nodes[m].op_type for m in members}
    op_type = g.nodes[anchor].op_type
    if len(members - {k for k in members if g.nodes[k].op_type in LAYOUT_OPS}) > 1:
        op_type = "Gelu(decomposed)" if ops & {"Erf", "Tanh"} else "Activation(decomposed)"
    inputs = tuple(t for t in sources if any(m in members for m in g.consumers_of(t)))
    out.add(anchor, Role.FFN_ACT, block.layer, inputs=inputs, members=tuple(sorted(members)), op_type=op_type)


def _assign_layer_norms(out: _Collector, norms: tuple[LayerNormMatch, ...], blocks: list[_Block]) -> str:
    """Give each LayerNorm its role; return the architecture: "gpt" (an LN inside the first branch: pre-LN),
    "bert" (an LN on a residual Add's output: post-LN) or "unknown" (blocks without a recognised LayerNorm)."""
    g = out.g
    if not blocks:
        return "unknown"
    pre_ln = any(set(ln.members) & blocks[0].residual.branch_nodes for ln in norms)
    after = {g.nodes[b.residual.add].output[0]: b for b in blocks}
    first_skip = blocks[0].residual.skip
    for ln in norms:
        role: Role | None = None
        layer: int | None = None
        inside = next((b for b in blocks if set(ln.members) & b.residual.branch_nodes), None)
        if inside is not None:
            role = Role.ATTN_LN if inside.core is not None else Role.FFN_LN
            layer = inside.layer
        elif ln.x in after:
            block = after[ln.x]
            layer = block.layer
            if block.core is not None:
                role = Role.ATTN_LN
            elif pre_ln and block is blocks[-1]:
                role, layer = Role.FINAL_LN, None
            else:
                role = Role.FFN_LN
        elif ln.out == first_skip or (ln.anchor < blocks[0].residual.add and not pre_ln):
            role = Role.EMBED_LN
        if role is None:
            continue
        op_type = "LayerNormalization" if ln.fused else "LayerNorm(decomposed)"
        members = ln.members if not ln.fused else ()
        out.add(ln.anchor, role, layer, inputs=(ln.x,), members=members, op_type=op_type)
    if pre_ln:
        return "gpt"
    return "bert" if any(ln.x in after for ln in norms) else "unknown"


def _hidden_size(out: _Collector, gemms: dict[int, WeightGemm]) -> int | None:
    for anchor, assignment in sorted(out.found.items()):
        if assignment.role in (Role.QKV, Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ) and anchor in gemms:
            return gemms[anchor].in_features
    return None
