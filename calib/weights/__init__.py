"""Weight quantization stage (quantize_weights() -> WeightSet): pure NumPy weight quantizers and their statistics.

Weights are [K, N] (ONNX MatMul layout: K inputs = reduction axis, N output channels); codes are symmetric
signed integers of 2..8 bits stored as int8, scales float32 per channel [N] or per block [K/B, N].

* :func:`rtn`  round to nearest, max or MSE scales             (calib.weights.rtn)
* :func:`optq` OPTQ/GPTQ from H = 2/n X^T X, optional AXE       (calib.weights.optq)
* :func:`gpfq` GPFQ from H~ = X~^T X~ and G = X~^T X, optional AXE (calib.weights.gpfq)
* :class:`HessianObserver`, :class:`GpfqObserver`: streaming, exactly mergeable statistics (calib.weights.hessian)
* accumulator bounds shared with the overflow verifier (calib.weights.accumulator)
"""

from calib.weights.accumulator import AccumulatorTarget, data_type_bound, min_accumulator_bits, worst_case
from calib.weights.config import GpfqConfig, OptqConfig, RtnConfig, ScaleMethod, WeightQuantConfig
from calib.weights.gpfq import gpfq
from calib.weights.grid import QuantizedWeight, qmax
from calib.weights.hessian import GpfqObserver, HessianObserver
from calib.weights.optq import optq
from calib.weights.rtn import choose_scales, max_scales, mse_scales, rtn

__all__ = [
    "AccumulatorTarget",
    "GpfqConfig",
    "GpfqObserver",
    "HessianObserver",
    "OptqConfig",
    "QuantizedWeight",
    "RtnConfig",
    "ScaleMethod",
    "WeightQuantConfig",
    "choose_scales",
    "data_type_bound",
    "gpfq",
    "max_scales",
    "min_accumulator_bits",
    "mse_scales",
    "optq",
    "qmax",
    "rtn",
    "worst_case",
]
