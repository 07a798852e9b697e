"""Verification stage: prove that no integer GEMM of a Q/DQ graph can overflow a P-bit accumulator.

For every MatMul/Gemm whose weight is an integer initializer behind a DequantizeLinear (the project's lowering:
``MatMul(X, DQ(W_int[K, N], scale[N], axis=1))``; also ``Gemm`` with ``transB=1`` and ``axis=0``; block-wise and
INT4 initializers read the same way), the integer weights alone decide the worst case: over all inputs x in
[x_min, x_max] the dot product of output channel c over tile j is at most x_max * P + x_min * Neg and at least
x_min * P + x_max * Neg (P, Neg: sums of the positive and negative weights; calib/weights/accumulator.py). The
graph is proved safe when every (tile, channel) lies inside the signed P-bit range [-2**(P-1), 2**(P-1) - 1];
otherwise the report lists the channels that can overflow with their margins (negative: by how much).
Bounds are computed in exact int64 arithmetic, and because every partial sum of a tile lies inside the tile's
bounds, the proof holds for any accumulation order within a tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from calib.errors import ConfigError, GraphError
from calib.schema import Schema
from calib.weights.accumulator import (
    MAX_ACCUMULATOR_BITS,
    bits_to_hold,
    check_accumulator_bits,
    input_range,
    tile_starts,
    twos_complement_range,
    worst_case,
)

REPORT_VERSION = 1
I64 = npt.NDArray[np.int64]
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                  onnx.TensorProto.INT32, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


class AccumulatorSpec(Schema, frozen=True):
    """The accumulator to prove: signed P bits per tile of T inputs (None: all K), N-bit activations."""

    accumulator_bits: int
    activation_bits: int = 8
    signed_inputs: bool = True
    tile: int | None = None

    def __post_init__(self) -> None:
        check_accumulator_bits(self.accumulator_bits)
        input_range(self.activation_bits, self.signed_inputs)
        if self.tile is not None and (isinstance(self.tile, bool) or self.tile < 1):
            raise ConfigError(f"accumulator tile {self.tile!r} must be a positive int (or None for one tile)")


class ChannelOverflow(Schema, frozen=True):
    """One (tile, output channel) whose worst-case dot product leaves the accumulator's range."""

    channel: int
    tile: int
    worst_low: int
    worst_high: int
    margin: int  # min(acc_max - worst_high, worst_low - acc_min); negative here


class GemmCheck(Schema, frozen=True):
    """The verdict for one GEMM."""

    node: str
    op_type: str
    weight: str
    k: int
    n: int
    tiles: int
    activation_quantized: bool  # the other input is also behind a DequantizeLinear (an integer GEMM)
    worst_low: int  # over all tiles and channels
    worst_high: int
    min_margin: int  # smallest margin over (tile, channel); negative: overflow possible
    tile_bits_needed: int  # smallest P that would prove this GEMM with the same tiles
    total_bits_needed: int  # bits an accumulator of the whole dot product (the outer one) needs
    overflowing: int  # (tile, channel) pairs that can overflow
    channels: tuple[ChannelOverflow, ...] = ()  # the worst of them, most negative margin first


class AccumulatorReport(Schema, frozen=True):
    """Every integer GEMM of a model checked against one accumulator spec."""

    model: str
    spec: AccumulatorSpec
    accumulator_min: int
    accumulator_max: int
    input_min: int
    input_max: int
    gemms: tuple[GemmCheck, ...]
    proved: bool  # no (tile, channel) of any GEMM can overflow
    version: int = REPORT_VERSION


@dataclass(frozen=True)
class IntegerGemm:
    """A GEMM with an integer weight, as [K, N] int64 (reduction over axis 0)."""

    node: str
    op_type: str
    weight: str
    values: I64
    activation_quantized: bool


def check_gemm(gemm: IntegerGemm, spec: AccumulatorSpec, max_listed: int = 10) -> GemmCheck:
    """Worst cases of one GEMM's integer weight per (tile, channel) against the spec's accumulator."""
    k, n = gemm.values.shape
    if spec.tile is not None and spec.tile > k:
        raise ConfigError(f"accumulator tile {spec.tile} is larger than K={k} of GEMM {gemm.node!r}; allowed 1..{k}")
    x_min, x_max = input_range(spec.activation_bits, spec.signed_inputs)
    acc_min, acc_max = twos_complement_range(spec.accumulator_bits)
    high, low = worst_case(gemm.values, x_min, x_max, spec.tile)
    margin = np.minimum(acc_max - high, low - acc_min)
    bad_tiles, bad_channels = np.nonzero(margin < 0)
    order = np.argsort(margin[bad_tiles, bad_channels], kind="stable")[:max_listed]
    listed = tuple(ChannelOverflow(channel=int(bad_channels[i]), tile=int(bad_tiles[i]),
                                   worst_low=int(low[bad_tiles[i], bad_channels[i]]),
                                   worst_high=int(high[bad_tiles[i], bad_channels[i]]),
                                   margin=int(margin[bad_tiles[i], bad_channels[i]])) for i in order)
    total_high, total_low = worst_case(gemm.values, x_min, x_max, None)
    return GemmCheck(
        node=gemm.node, op_type=gemm.op_type, weight=gemm.weight, k=k, n=n, tiles=len(tile_starts(k, spec.tile)),
        activation_quantized=gemm.activation_quantized, worst_low=int(low.min()), worst_high=int(high.max()),
        min_margin=int(margin.min()), tile_bits_needed=bits_to_hold(int(low.min()), int(high.max())),
        total_bits_needed=bits_to_hold(int(total_low.min()), int(total_high.max())),
        overflowing=int(bad_tiles.size), channels=listed)


def _integer_initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    for init in model.graph.initializer:
        if init.name == name:
            return init if init.data_type in _INTEGER_TYPES else None
    return None


def _weight_from_dq(model: onnx.ModelProto, dq: onnx.NodeProto) -> tuple[str, I64] | None:
    """(initializer name, integer values) of a DequantizeLinear over an integer initializer with zero zero-point."""
    init = _integer_initializer(model, dq.input[0])
    if init is None:
        return None
    values = numpy_helper.to_array(init).astype(np.int64)
    if len(dq.input) > 2 and dq.input[2]:
        zero = next((z for z in model.graph.initializer if z.name == dq.input[2]), None)
        if zero is None or np.any(numpy_helper.to_array(zero).astype(np.int64) != 0):
            raise GraphError(f"DequantizeLinear {dq.name!r} of weight {init.name!r} has a non-zero or non-constant "
                             "zero point; only symmetric integer weights can be verified")
    return init.name, values


def integer_gemms(model: onnx.ModelProto) -> list[IntegerGemm]:
    """Every MatMul/Gemm whose second input is a DequantizeLinear of a 2-D integer initializer, in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output if out}
    found: list[IntegerGemm] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        weight = _weight_from_dq(model, dq)
        if weight is None or weight[1].ndim != 2:
            continue
        name, values = weight
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            values = values.T  # stored [N, K]
        source = producer.get(node.input[0])
        found.append(IntegerGemm(node=node.name, op_type=node.op_type, weight=name, values=np.ascontiguousarray(values),
                                 activation_quantized=source is not None and source.op_type == "DequantizeLinear"))
    return found


def verify_model(model: onnx.ModelProto, spec: AccumulatorSpec, name: str = "model",
                 max_listed: int = 10) -> AccumulatorReport:
    """Check every integer GEMM of ``model``; GraphError when it has none, ConfigError for a tile > K."""
    gemms = integer_gemms(model)
    if not gemms:
        raise GraphError(f"{name}: no MatMul/Gemm reads an integer weight through a DequantizeLinear; "
                         "verify a quantized (Q/DQ) model")
    too_small = [g.node for g in gemms if spec.tile is not None and spec.tile > g.values.shape[0]]
    if too_small:
        k_min = min(g.values.shape[0] for g in gemms)
        raise ConfigError(f"accumulator tile {spec.tile} is larger than K of {len(too_small)} GEMMs "
                          f"(e.g. {too_small[0]!r}); allowed 1..{k_min}")
    checks = tuple(check_gemm(g, spec, max_listed) for g in gemms)
    acc_min, acc_max = twos_complement_range(spec.accumulator_bits)
    x_min, x_max = input_range(spec.activation_bits, spec.signed_inputs)
    return AccumulatorReport(model=name, spec=spec, accumulator_min=acc_min, accumulator_max=acc_max,
                             input_min=x_min, input_max=x_max, gemms=checks,
                             proved=all(c.overflowing == 0 for c in checks))


def format_report(report: AccumulatorReport, show: int = 5) -> str:
    """A table of every GEMM, then the worst channels of each GEMM that can overflow (``show`` per GEMM)."""
    spec = report.spec
    tile = "whole K" if spec.tile is None else f"{spec.tile} inputs"
    lines = [f"accumulator: signed {spec.accumulator_bits}-bit [{report.accumulator_min}, {report.accumulator_max}] "
             f"per tile of {tile}; inputs: {'signed' if spec.signed_inputs else 'unsigned'} {spec.activation_bits}-bit "
             f"[{report.input_min}, {report.input_max}]",
             f"{'node':<56} {'op':<6} {'K':>5} {'N':>5} {'tiles':>5} {'worst low':>12} {'worst high':>12} "
             f"{'margin':>11} {'P needed':>8} {'overflow':>9}"]
    for g in report.gemms:
        node = g.node if len(g.node) <= 56 else "..." + g.node[-53:]
        lines.append(f"{node:<56} {g.op_type:<6} {g.k:>5} {g.n:>5} {g.tiles:>5} {g.worst_low:>12} {g.worst_high:>12} "
                     f"{g.min_margin:>11} {g.tile_bits_needed:>8} {g.overflowing:>9}")
    failing = [g for g in report.gemms if g.overflowing]
    for g in failing:
        lines.append(f"{g.node}: {g.overflowing} of {g.tiles * g.n} (tile, channel) pairs can overflow; worst:")
        lines.extend(f"  channel {c.channel:>5} tile {c.tile:>3}: worst [{c.worst_low}, {c.worst_high}], "
                     f"margin {c.margin}" for c in g.channels[:show])
    if report.proved:
        lines.append(f"proved: no input in range can overflow the accumulator in any of {len(report.gemms)} GEMMs")
    else:
        pairs = sum(g.overflowing for g in failing)
        lines.append(f"overflow possible in {len(failing)} of {len(report.gemms)} GEMMs ({pairs} (tile, channel) "
                     f"pairs); the largest P needed is {max(g.tile_bits_needed for g in report.gemms)}")
    return "\n".join(lines) + "\n"


__all__ = ["MAX_ACCUMULATOR_BITS", "AccumulatorReport", "AccumulatorSpec", "ChannelOverflow", "GemmCheck",
           "IntegerGemm", "check_gemm", "format_report", "integer_gemms", "verify_model"]
