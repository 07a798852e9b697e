"""Lowering stage: SPARQ as an exact composition of standard ONNX ops between QuantizeLinear and DequantizeLinear.

    x -> QuantizeLinear(s) -> [sparq_nodes: INT8 codes -> SPARQ-trimmed INT8 codes] -> DequantizeLinear(s) -> GEMM

The codes stay INT8, so an engine holds the trimmed values exactly; the GEMM still runs as an ordinary INT8
GEMM. Only the accuracy effect of SPARQ is reproduced this way: the speed-up needs hardware whose multipliers
take the n-bit window (Shomron et al., NeurIPS 2021, arXiv 2105.11010, section 4).

The numerics are ``calib.sparq`` (its docstring defines windows, rounding, saturation and the sign handling),
computed in float32, where every intermediate is an integer below 2**15 and therefore exact:

    xf = Cast(q, FLOAT)      m = Abs(xf)      neg = Less(xf, 0)      ceiling = Where(neg, 128, 127)
    s  = 2**lsb of the window holding m's leading one: Where(m >= 2**(n + (j-1)d), 2**(j d), ...), j = 1..P-1
    w  = Round(m / s) (half to even, as ONNX Round) | Floor(m / s)     (m / s is exact: s is a power of two)
    w  = Min(w, Min(2**n - 1, Floor(ceiling / s)))                     saturation: window, then sign range
    r  = w * s;   vSPARQ: r = Where(xf * partner == 0, r_2n, r)  (partner: Gather along the last axis)
    y  = Cast(Where(neg, -r, r), INT8)

Only ops TensorRT parses, default domain, opset 13 to 19 (Cast, Abs, Less, GreaterOrEqual, Where, Div,
Round, Floor, Min, Mul, Neg, Gather, Equal); TensorRT-RTX 1.7 builds it (``tests/integration/test_sparq_rtx.py``).
Every emitted node carries the metadata ``build_engine.sparq`` = its prefix, and the last node the config as
JSON, so graph checks can recognize the span (:func:`find_compositions`) instead of being bypassed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib.errors import ConfigError, GraphError
from calib.schema import decode_json, to_json
from calib.sparq import ACTIVATION_BITS, NEGATIVE_CEILING, POSITIVE_CEILING, Rounding, SparqConfig, window_step

LOG = logging.getLogger(__name__)

MIN_OPSET = 13  # GreaterOrEqual needs 12; Cast, Gather, Min, Where ... at their opset-13 definitions
METADATA_KEY = "build_engine.sparq"
METADATA_ROLE = "build_engine.sparq.role"
METADATA_CONFIG = "build_engine.sparq.config"


class SparqNodes(NamedTuple):
    """What to add to a graph: nodes in topological order and the constant initializers they read."""

    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]


@dataclass(frozen=True, kw_only=True)
class SparqSpan:
    """One composition found in a graph: INT8 codes in, trimmed INT8 codes out, and its options."""

    prefix: str
    input_name: str
    output_name: str
    config: SparqConfig


class _Emitter:
    """Appends nodes named ``prefix/<op>_<k>`` and deduplicated float32 scalar constants ``prefix/c<value>``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}

    def const(self, value: float | np.ndarray, tag: str | None = None) -> str:
        name = f"{self.prefix}/c_{tag if tag is not None else format(float(value), 'g')}"
        if name not in self.inits:
            array = value if isinstance(value, np.ndarray) else np.array(value, dtype=np.float32)
            self.inits[name] = numpy_helper.from_array(array, name)
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: int) -> str:
        k = len(self.nodes)
        out = output if output is not None else f"{self.prefix}/{op_type}_{k}_out"
        node = helper.make_node(op_type, inputs, [out], name=f"{self.prefix}/{op_type}_{k}")
        node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
        helper.set_metadata_props(node, {METADATA_KEY: self.prefix, METADATA_ROLE: "body"})
        self.nodes.append(node)
        return out


def _trim(em: _Emitter, m: str, ceiling: str, window_bits: int, placements: int, rounding: Rounding) -> str:
    """float32 window value of magnitudes ``m`` (see the module docstring)."""
    d = window_step(window_bits, placements)
    step = em.const(1.0)
    for j in range(1, placements):
        reached = em.op("GreaterOrEqual", [m, em.const(float(1 << (window_bits + (j - 1) * d)))])
        step = em.op("Where", [reached, em.const(float(1 << (j * d))), step])
    ratio = em.op("Div", [m, step])
    kept = em.op("Round" if rounding is Rounding.NEAREST_EVEN else "Floor", [ratio])
    room = em.op("Floor", [em.op("Div", [ceiling, step])])
    top = em.op("Min", [room, em.const(float((1 << window_bits) - 1))])
    return em.op("Mul", [em.op("Min", [kept, top]), step])


def _pair_has_zero(em: _Emitter, xf: str, reduction_size: int) -> str:
    """Bool per element: is it or its partner (2i <-> 2i+1 along the last axis) zero? Odd tail: always."""
    perm = np.arange(reduction_size, dtype=np.int64) ^ 1  # 0<->1, 2<->3, ...
    odd = reduction_size % 2 == 1
    if odd:
        perm[-1] = reduction_size - 1  # itself, then multiplied by 0 below: the kernel's zero padding
    partner = em.op("Gather", [xf, em.const(perm, tag="partner_index")], axis=-1)
    if odd:
        keep = np.ones(reduction_size, dtype=np.float32)
        keep[-1] = 0.0
        partner = em.op("Mul", [partner, em.const(keep, tag="partner_keep")])
    return em.op("Equal", [em.op("Mul", [xf, partner]), em.const(0.0)])


def _check_names(input_name: str, output_name: str, prefix: str) -> None:
    for what, value in (("input tensor name", input_name), ("output tensor name", output_name),
                        ("name prefix", prefix)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"SPARQ composition: the {what} must be a non-empty string, got {value!r}")
    if input_name == output_name:
        raise ConfigError(f"SPARQ composition: input and output are both {input_name!r}; they must differ")


def sparq_nodes(
    input_name: str, output_name: str, prefix: str, config: SparqConfig, *, reduction_size: int | None = None,
) -> SparqNodes:
    """Nodes and initializers that map INT8 codes ``input_name`` to SPARQ-trimmed INT8 codes ``output_name``.

    ``prefix`` makes every node, intermediate tensor and initializer name unique (``prefix/...``); use one
    prefix per insertion. vSPARQ pairs along the last axis and needs its static length ``reduction_size``
    (the GEMM's K); bSPARQ is elementwise and ignores it. The result equals ``calib.sparq.sparq_int8``.
    """
    _check_names(input_name, output_name, prefix)
    if config.vsparq and (isinstance(reduction_size, bool) or not isinstance(reduction_size, int)
                          or reduction_size < 1):
        raise ConfigError(f"vSPARQ pairs along the last axis and needs its static length (the GEMM's K) as "
                          f"reduction_size, a positive integer; got {reduction_size!r}")
    em = _Emitter(prefix)
    xf = em.op("Cast", [input_name], to=TensorProto.FLOAT)
    m = em.op("Abs", [xf])
    negative = em.op("Less", [xf, em.const(0.0)])
    ceiling = em.op("Where", [negative, em.const(float(NEGATIVE_CEILING)), em.const(float(POSITIVE_CEILING))])
    r = _trim(em, m, ceiling, config.window_bits, config.positions, config.rounding)
    if config.vsparq:
        assert reduction_size is not None
        wide_bits = config.wide_bits
        wide = m if wide_bits >= ACTIVATION_BITS else _trim(
            em, m, ceiling, wide_bits, ACTIVATION_BITS + 1 - wide_bits, config.rounding)
        r = em.op("Where", [_pair_has_zero(em, xf, reduction_size), wide, r])
    signed = em.op("Where", [negative, em.op("Neg", [r]), r])
    em.op("Cast", [signed], output=output_name, to=TensorProto.INT8)
    helper.set_metadata_props(em.nodes[0], {METADATA_KEY: prefix, METADATA_ROLE: "input"})
    helper.set_metadata_props(em.nodes[-1], {METADATA_KEY: prefix, METADATA_ROLE: "output",
                                             METADATA_CONFIG: to_json(config).strip()})
    LOG.debug("SPARQ composition %s: %s, %d nodes", prefix, config.label(), len(em.nodes))
    return SparqNodes(nodes=em.nodes, initializers=list(em.inits.values()))


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def find_compositions(graph: onnx.GraphProto) -> list[SparqSpan]:
    """Every SPARQ composition in ``graph`` (by the metadata :func:`sparq_nodes` writes), in graph order.

    Raises GraphError when a tagged span lacks its input or output node (a pass dropped part of it).
    """
    ends: dict[str, dict[str, onnx.NodeProto]] = {}
    order: list[str] = []
    for node in graph.node:
        meta = _metadata(node)
        prefix = meta.get(METADATA_KEY)
        if prefix is None:
            continue
        if prefix not in ends:
            ends[prefix] = {}
            order.append(prefix)
        role = meta.get(METADATA_ROLE, "body")
        if role in ("input", "output"):
            ends[prefix][role] = node
    spans = []
    for prefix in order:
        found = ends[prefix]
        if set(found) != {"input", "output"}:
            raise GraphError(f"SPARQ composition {prefix!r} is incomplete: it lacks its "
                             f"{' and '.join(sorted({'input', 'output'} - set(found)))} node")
        try:
            config = decode_json(_metadata(found["output"]).get(METADATA_CONFIG, ""), SparqConfig, "it")
        except ConfigError as exc:
            raise GraphError(f"SPARQ composition {prefix!r} config metadata: {exc}") from exc
        spans.append(SparqSpan(prefix=prefix, input_name=found["input"].input[0],
                               output_name=found["output"].output[0], config=config))
    return spans


__all__ = ["MIN_OPSET", "SparqNodes", "SparqSpan", "find_compositions", "sparq_nodes"]
