"""Quantizer seam (planning, weights and lowering stages): what every registered quantizer provides.

A quantizer is a frozen config type (a calib.schema.Schema: a recipe names the quantizer and gives its typed
options) plus four things:

* the observer kinds it needs from calibration (calib.observers),
* ``decide``: its per-edge parameters, computed from the Statistics into the QuantPlan,
* its lowering rule: how those parameters are written into the ONNX graph,
* a NumPy ``reference``: what the lowered graph computes, which tests hold the graph against.

Activation quantizers quantize one tensor (the input of weight GEMMs, an operand of a batched MatMul, or a
node's output for every reader); weight quantizers turn a float weight into integers and scales (the WeightSet
stage). A new method is one module with one such class and one registration (builder.quant.registry).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from calib.schema import Schema
from calib.statistics import TensorStatistics

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge

F32 = npt.NDArray[np.float32]
ConfigT = TypeVar("ConfigT", bound=Schema)
ParamsT = TypeVar("ParamsT", bound=Schema)


class Placement(StrEnum):
    """Where an activation quantizer sits."""

    WEIGHT_INPUT = "weight_input"  # the activation input of GEMMs with a constant weight (named consumers)
    OPERAND = "operand"  # an activation operand of a batched MatMul (Q.K^T, P.V)
    OUTPUT = "output"  # a node's output, for every reader (LayerNorm, softmax)


@dataclass(frozen=True, kw_only=True)
class EdgeContext:
    """What ``decide`` may read about one quantized tensor."""

    tensor: str
    placement: Placement
    consumers: tuple[str, ...]  # the GEMM nodes reading the quantized value ("*" for OUTPUT)
    statistics: TensorStatistics
    weights: Mapping[str, Callable[[], tuple[F32, int]]] = field(default_factory=dict)  # node -> (weight, axis)


class ActivationQuantizer(abc.ABC, Generic[ConfigT, ParamsT]):
    """A registered activation quantizer (see the module docstring)."""

    name: ClassVar[str]
    config_type: ClassVar[type[Schema]]
    params_type: ClassVar[type[Schema]]
    placements: ClassVar[frozenset[Placement]]
    observers: ClassVar[tuple[str, ...]] = ("minmax",)
    joins_scale_groups: ClassVar[bool] = False  # params have ``amax`` and may share one scale (Q, K and V)
    lowering_pass: ClassVar[str] = "qdq"  # "fold" (rewrites producers), "split" (rewrites consumers) or "qdq"

    @abc.abstractmethod
    def decide(self, edge: EdgeContext, config: ConfigT) -> ParamsT:
        """The per-edge parameters (ranges, scales, groups) from the tensor's statistics."""

    @abc.abstractmethod
    def describe(self, config: ConfigT, params: ParamsT) -> str:
        """A short label of how the range was chosen (``max``, ``mse+center``; shown in plan.json)."""

    @abc.abstractmethod
    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        """Write the edge into the graph (Q/DQ and whatever the method needs)."""

    @abc.abstractmethod
    def reference(self, x: F32, params: ParamsT) -> F32:
        """NumPy: the value the consumers read in place of ``x`` (the lowered graph computes exactly this)."""

    def weight_views(self, params: ParamsT, weight: F32, axis: int) -> dict[str, F32]:
        """The float weights a consumer GEMM multiplies once this edge is lowered, in the stored layout whose
        output channels lie along ``axis``, keyed by a view name that is also the suffix of their initializer
        names: ``{"": weight}`` when the weight is unchanged, ``{"fwq": diag(S) W}`` for HERO FWQ, one slice
        per group for PEG. The WeightSet stage quantizes every view."""
        del params, axis
        return {"": weight}


@dataclass(frozen=True, kw_only=True)
class QuantizedWeight:
    """Integer weights and their scales, in the layout of the stored weight.

    ``values`` are integers in [-(2**(bits-1) - 1), 2**(bits-1) - 1] (stored as int8); ``scales`` float32 of
    shape [channels] (per output channel along ``axis``) or [K / block, channels] (per block of ``block``
    rows of the reduction axis).
    """

    values: npt.NDArray[np.int8]
    scales: F32
    axis: int  # output-channel axis of the stored weight
    bits: int
    block: int | None = None

    def dequantize(self) -> F32:
        """values * scales in float32, in the stored layout (what DequantizeLinear computes)."""
        if self.block is None:
            shape = [1] * self.values.ndim
            shape[self.axis] = -1
            return (self.values.astype(np.float32) * self.scales.reshape(shape)).astype(np.float32)
        reduction = 1 - self.axis
        expanded = np.repeat(self.scales, self.block, axis=0)  # [K, channels]
        if reduction == 1:
            expanded = expanded.T
        return (self.values.astype(np.float32) * expanded).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class WeightContext:
    """What a weight quantizer may read besides the weight: the GEMM's input statistics."""

    node: str
    input_statistics: TensorStatistics | None = None


class WeightQuantizer(abc.ABC, Generic[ConfigT]):
    """A registered weight quantizer (RTN, OPTQ, GPFQ, AXE ...)."""

    name: ClassVar[str]
    config_type: ClassVar[type[Schema]]
    observers: ClassVar[tuple[str, ...]] = ()  # observer kinds of the GEMM input (a Hessian for OPTQ)

    @abc.abstractmethod
    def quantize(self, weight: F32, axis: int, config: ConfigT, ctx: WeightContext) -> QuantizedWeight:
        """Integers and scales of a float ``weight`` whose output channels lie along ``axis``."""

    @abc.abstractmethod
    def lower(self, ctx: LoweringContext, weight: QuantizedWeight, base: str) -> str:
        """Write the stored weight (initializers + DequantizeLinear); return the dequantized tensor's name."""

    def reference(self, weight: QuantizedWeight) -> F32:
        """NumPy: the float weight the GEMM multiplies (the dequantized integers)."""
        return weight.dequantize()

