"""Analysis stage: roles inside one transformer block (attention or FFN branch) and of the normalizations.

Inside an attention branch, projections are told apart by which of Q, K^T and V they feed; inside an FFN
branch, fc2 is the GEMM feeding the residual and fc1 every GEMM feeding another. A parallel block (GPT-J,
GPT-NeoX, Falcon: ``x + attn(norm(x)) + mlp(norm'(x))``) has both in one branch: the GEMMs that neither feed
the attention core nor follow it are its FFN. A gated MLP (Shazeer 2020,
"GLU Variants Improve Transformer", arXiv 2002.05202, eq. 5-6: ``FFN(x) = (act(x W) * x V) W2``) has two
such GEMMs: ``gate_proj`` is the one whose output passes a nonlinearity before the product, ``up_proj`` the
one that does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.graph.norms import NormMatch, stream_source
from builder.graph.patterns import LAYOUT_OPS, AttentionCore, Residual, Rotary
from builder.graph.report import Architecture, Operand, Role, RoleAssignment
from builder.graph.topology import GraphIndex
from builder.graph.weights import WeightGemm, weight_readers

# ops that make a GEMM output "activated" (the gate of a gated MLP)
NONLINEAR_OPS = frozenset({"Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
                           "HardSigmoid", "HardSwish", "Softplus", "Elu", "Selu", "LeakyRelu", "Mish", "Swish"})


@dataclass(frozen=True)
class Block:
    """One residual branch on the stream: attention (``core`` set) or FFN."""

    residual: Residual
    layer: int
    core: AttentionCore | None


@dataclass
class Collector:
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
        operands: tuple[Operand, ...] = (),
    ) -> None:
        node = self.g.nodes[anchor]
        if inputs is None:
            inputs = tuple(t for t in node.input if t and not self.g.is_const(t))
        self.found[anchor] = RoleAssignment(
            node=node.name, op_type=op_type or node.op_type, role=role, layer=layer, inputs=inputs,
            outputs=tuple(t for t in node.output if t), members=tuple(self.g.nodes[m].name for m in members),
            operands=operands,
        )

    def gemm(self, gemm: WeightGemm, role: Role, layer: int | None) -> None:
        g = self.g
        node = g.nodes[gemm.node]
        shared = tuple(g.nodes[r].name for r in weight_readers(g, gemm.weight) if r != gemm.node)
        self.found[gemm.node] = RoleAssignment(
            node=node.name, op_type=node.op_type, role=role, layer=layer, inputs=(gemm.x,),
            outputs=tuple(t for t in node.output if t), weight=gemm.weight, weight_axis=gemm.weight_axis,
            weight_path=tuple(g.nodes[j].name for j in gemm.path), weight_shared_with=shared,
        )


def assign_block(out: Collector, block: Block, gemms: dict[int, WeightGemm], rotaries: tuple[Rotary, ...]) -> None:
    res = block.residual
    inside = [gemms[i] for i in sorted(res.branch_nodes & frozenset(gemms))]
    if block.core is not None:
        _assign_attention(out, block, block.core, inside, rotaries)
        parallel = [w for w in inside if w.node not in out.found]
        if parallel:  # a parallel block (GPT-J, GPT-NeoX, Falcon): x + attn(norm(x)) + mlp(norm'(x))
            _assign_ffn(out, block, parallel)
        return
    out.add(res.add, Role.FFN_RESIDUAL, block.layer)
    _assign_ffn(out, block, inside)


def _assign_ffn(out: Collector, block: Block, inside: list[WeightGemm]) -> None:
    """FFN roles of ``inside``: fc2 the GEMMs feeding none of the others, fc1 (or gate/up) the rest."""
    g, res, layer = out.g, block.residual, block.layer
    inside_ids = frozenset(w.node for w in inside)
    fc1 = [w for w in inside if g.descendants([w.out], res.branch_nodes) & inside_ids]
    fc2 = [w for w in inside if w not in fc1]
    first_roles = _first_roles(g, fc1, fc2, res.branch_nodes)
    for w in fc1:
        out.gemm(w, first_roles[w.node], layer)
    for w in fc2:
        out.gemm(w, Role.FC2, layer)
        _assign_activation(out, w, fc1, block)


def _assign_attention(out: Collector, block: Block, core: AttentionCore, inside: list[WeightGemm],
                      rotaries: tuple[Rotary, ...]) -> None:
    g, res, layer = out.g, block.residual, block.layer
    out.add(core.qk, Role.ATTN_QK, layer, operands=("q", "k"))
    out.add(core.softmax, Role.ATTN_SOFTMAX, layer)
    out.add(core.pv, Role.ATTN_PV, layer, operands=core.pv_operands)
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
    for rot in rotaries:
        if rot.anchor in feeds["q"] | feeds["k"]:
            op_type = "RotaryEmbedding" if rot.fused else "Rotary(decomposed)"
            members = () if rot.fused else rot.members
            out.add(rot.anchor, Role.ROTARY, layer, inputs=(rot.x,), members=members, op_type=op_type)


def _first_roles(g: GraphIndex, fc1: list[WeightGemm], fc2: list[WeightGemm],
                 branch: frozenset[int]) -> dict[int, Role]:
    """FC1 for every first FFN GEMM, except the two GEMMs of a gated MLP: gate_proj and up_proj."""
    roles = {w.node: Role.FC1 for w in fc1}
    if len(fc1) != 2 or len(fc2) != 1:
        return roles
    activated = []
    for w in fc1:
        path = g.between(w.out, fc2[0].x) & branch
        activated.append(any(g.nodes[j].op_type in NONLINEAR_OPS for j in path))
    if activated.count(True) == 1:
        for w, is_gate in zip(fc1, activated, strict=True):
            roles[w.node] = Role.GATE_PROJ if is_gate else Role.UP_PROJ
    return roles


def _assign_activation(out: Collector, fc2: WeightGemm, fc1: list[WeightGemm], block: Block) -> None:
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
    inputs = tuple(t for t in sources if any(m in members for m in g.consumers_of(t)))
    op_type = _activation_kind(g, members, anchor, gated=len(inputs) > 1)
    out.add(anchor, Role.FFN_ACT, block.layer, inputs=inputs, members=tuple(sorted(members)), op_type=op_type)


def _activation_kind(g: GraphIndex, members: frozenset[int], anchor: int, gated: bool) -> str:
    ops = {g.nodes[m].op_type for m in members}
    if gated:
        if "Sigmoid" in ops:
            return "SwiGLU(decomposed)"
        return "GeGLU(decomposed)" if ops & {"Erf", "Tanh", "Gelu"} else "GLU(decomposed)"
    if len(members - {k for k in members if g.nodes[k].op_type in LAYOUT_OPS}) > 1:
        if ops & {"Erf", "Tanh"}:
            return "Gelu(decomposed)"
        return "SiLU(decomposed)" if "Sigmoid" in ops else "Activation(decomposed)"
    return g.nodes[anchor].op_type


def assign_norms(out: Collector, norms: tuple[NormMatch, ...], blocks: list[Block]) -> Architecture:
    """Give each norm its role; return the architecture: "gpt"/"llama" (a LayerNorm/RMSNorm inside the first
    branch: pre-norm), "bert" (a norm on a residual Add's output: post-norm) or "unknown" (blocks without a
    recognised norm)."""
    g = out.g
    if not blocks:
        return "unknown"
    first = blocks[0].residual.branch_nodes
    pre = [n for n in norms if set(n.members) & first]
    after = {g.nodes[b.residual.add].output[0]: b for b in blocks}
    first_skip = stream_source(g, blocks[0].residual.skip)
    attention_inputs = frozenset(k for k, a in out.found.items()
                                 if a.role in (Role.QKV, Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ))
    for norm in norms:
        role, layer = _norm_role(norm, blocks, after, first_skip, pre_norm=bool(pre))
        if role == Role.ATTN_LN and _feeds_only_parallel_ffn(g, norm, blocks, attention_inputs, out.found):
            role = Role.FFN_LN
        if role is None:
            continue
        members = norm.members if not norm.fused else ()
        out.add(norm.anchor, role, layer, inputs=(norm.x,), members=members, op_type=norm.op_type)
    if pre:
        return "llama" if any(n.rms for n in pre) else "gpt"
    return "bert" if any(n.source in after for n in norms) else "unknown"


def _feeds_only_parallel_ffn(g: GraphIndex, norm: NormMatch, blocks: list[Block], attention_inputs: frozenset[int],
                             found: dict[int, RoleAssignment]) -> bool:
    """A norm inside an attention branch whose output reaches FFN GEMMs of that branch but no Q/K/V projection
    (the MLP's own norm in a parallel block)."""
    inside = next((b for b in blocks if set(norm.members) & b.residual.branch_nodes), None)
    if inside is None or inside.core is None:
        return False
    reached = g.descendants([norm.out], inside.residual.branch_nodes)
    ffn = {k for k in reached if k in found and found[k].role in (Role.FC1, Role.GATE_PROJ, Role.UP_PROJ)}
    return bool(ffn) and not reached & attention_inputs


def _norm_role(norm: NormMatch, blocks: list[Block], after: dict[str, Block], first_skip: str,
               pre_norm: bool) -> tuple[Role | None, int | None]:
    inside = next((b for b in blocks if set(norm.members) & b.residual.branch_nodes), None)
    if inside is not None:
        return (Role.ATTN_LN if inside.core is not None else Role.FFN_LN), inside.layer
    if norm.source in after:
        block = after[norm.source]
        if block.core is not None:
            return Role.ATTN_LN, block.layer
        if pre_norm and block is blocks[-1]:
            return Role.FINAL_LN, None
        return Role.FFN_LN, block.layer
    if norm.out == first_skip or (norm.anchor < blocks[0].residual.add and not pre_norm):
        return Role.EMBED_LN, None
    return None, None
