"""Model intake stage: the float model every later stage works on, from the file a user gives.

:func:`prepare_model` loads and checks the file (builder.graph.load) and, when its GEMM weights are stored
weight-only quantized (integer initializers dequantized in the graph, as third-party INT8 exports ship them),
folds them back to exact float initializers (builder.intake.dequantize) so the model can be analysed,
calibrated and re-quantized like any float model; the fold computes bit for bit what the file computed. A
float16 or bfloat16 model is first rewritten to compute in float32 (builder.intake.upcast). A float32 model
is returned as loaded, never copied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from builder.graph.load import load_model
from builder.graph.topology import GraphIndex
from builder.graph.weights import WeightKind, find_weight_gemms
from builder.intake.dequantize import DequantizeFold, fold_weight_dequantization
from builder.intake.upcast import Upcast, upcast_to_float32

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    """The float model (weight-only quantized weights folded), the file it came from and what was folded."""

    model: onnx.ModelProto
    path: Path
    fold: DequantizeFold
    upcast: Upcast = field(default_factory=Upcast)

    @property
    def folded(self) -> bool:
        return bool(self.fold.folded)

    @property
    def rewritten(self) -> bool:
        """Whether :attr:`model` differs from the file (later stages then work on it, not on the file)."""
        return self.folded or self.upcast.changed

    def describe(self) -> str:
        """Lines for the user: what intake rewrote (empty when the model is the file's)."""
        lines = []
        if self.upcast.changed:
            up = self.upcast
            lines.append(f"{self.path.name}: half-precision model computed in float32 from here on ({up.initializers} "
                         f"initializers, {up.constants} constants, {up.casts} casts and {up.values} declared types "
                         "converted exactly; its float inputs and outputs become float32)")
        if self.folded:
            lines.append(self.describe_fold())
        return "\n".join(lines)

    def describe_fold(self) -> str:
        """One line for the user: what the fold did (empty when nothing was folded)."""
        if not self.fold.folded:
            return ""
        kinds = sorted({w.dtype for w in self.fold.folded})
        return (f"{self.path.name}: {len(self.fold.folded)} weight-only quantized weights ({', '.join(kinds)}) "
                "folded back to float for re-quantization (exact: the folded model computes what the file does)")


def has_quantized_weights(model: onnx.ModelProto) -> bool:
    """Whether some GEMM weight is an integer initializer dequantized in the graph."""
    return any(w.kind == WeightKind.DEQUANTIZED for w in find_weight_gemms(GraphIndex.build(model.graph)))


def prepare_model(path: Path) -> PreparedModel:
    """Load ``path``; a half-precision model in float32; weight-only quantized GEMM weights folded to float."""
    model, upcast = upcast_to_float32(load_model(path))
    if not has_quantized_weights(model):
        prepared = PreparedModel(model=model, path=Path(path), fold=DequantizeFold(), upcast=upcast)
    else:
        folded, fold = fold_weight_dequantization(model)
        prepared = PreparedModel(model=folded, path=Path(path), fold=fold, upcast=upcast)
    if prepared.rewritten:
        logger.info("%s", prepared.describe())
    return prepared
