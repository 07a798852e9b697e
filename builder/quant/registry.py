"""Quantizer seam: the registry of activation and weight quantizers, keyed by name and by config type.

One explicit dict per kind. Built-in quantizers are registered at the bottom of this module; a new method
registers itself with :func:`register_activation` / :func:`register_weight` (tests register toy ones). A
recipe names a quantizer (``activation: {quantizer: centered, range: mse}``); :func:`activation_config`
turns that mapping into the quantizer's typed config, rejecting unknown options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from builder.quant.base import ActivationQuantizer, WeightQuantizer
from calib.errors import ConfigError, suggest
from calib.schema import Schema, convert, to_builtins

ACTIVATION_QUANTIZERS: dict[str, ActivationQuantizer[Any, Any]] = {}
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer[Any]] = {}
_BY_CONFIG: dict[type[Schema], ActivationQuantizer[Any, Any] | WeightQuantizer[Any]] = {}


def _register(table: dict[str, Any], quantizer: Any, kind: str) -> None:
    existing = table.get(quantizer.name)
    if existing is not None and type(existing) is not type(quantizer):
        raise ConfigError(f"{kind} quantizer name {quantizer.name!r} is already registered by "
                          f"{type(existing).__qualname__}")
    owner = _BY_CONFIG.get(quantizer.config_type)
    if owner is not None and type(owner) is not type(quantizer):
        raise ConfigError(f"config type {quantizer.config_type.__qualname__} already belongs to {owner.name!r}")
    table[quantizer.name] = quantizer
    _BY_CONFIG[quantizer.config_type] = quantizer


def register_activation(quantizer: ActivationQuantizer[Any, Any]) -> ActivationQuantizer[Any, Any]:
    """Make ``quantizer`` available to recipes and plans under ``quantizer.name``."""
    _register(ACTIVATION_QUANTIZERS, quantizer, "activation")
    return quantizer


def register_weight(quantizer: WeightQuantizer[Any]) -> WeightQuantizer[Any]:
    """Make ``quantizer`` available to recipes and plans under ``quantizer.name``."""
    _register(WEIGHT_QUANTIZERS, quantizer, "weight")
    return quantizer


def activation_quantizer(name: str) -> ActivationQuantizer[Any, Any]:
    try:
        return ACTIVATION_QUANTIZERS[name]
    except KeyError:
        known = sorted(ACTIVATION_QUANTIZERS)
        raise ConfigError(f"unknown activation quantizer {name!r}; known: {', '.join(known)}"
                          f"{suggest(name, known)}") from None


def weight_quantizer(name: str) -> WeightQuantizer[Any]:
    try:
        return WEIGHT_QUANTIZERS[name]
    except KeyError:
        known = sorted(WEIGHT_QUANTIZERS)
        raise ConfigError(f"unknown weight quantizer {name!r}; known: {', '.join(known)}"
                          f"{suggest(name, known)}") from None


def quantizer_of(config: Schema) -> ActivationQuantizer[Any, Any] | WeightQuantizer[Any]:
    """The registered quantizer whose config type ``config`` is."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__qualname__} is not the config of a registered quantizer") from None


def _config(data: Any, where: str, lookup: Any) -> Schema:
    if isinstance(data, str):
        data = {"quantizer": data}
    if not isinstance(data, Mapping) or "quantizer" not in data:
        raise ConfigError(f"{where}: expected a mapping with a 'quantizer' key (e.g. {{quantizer: static, "
                          f"range: max}}), got {data!r}")
    options = {k: v for k, v in data.items() if k != "quantizer"}
    quantizer = lookup(str(data["quantizer"]))
    config: Schema = convert(options, quantizer.config_type, f"{where} ({quantizer.name})")
    return config


def activation_config(data: Any, where: str) -> Schema:
    """The typed config of ``{quantizer: <name>, <option>: ...}`` (or a bare name) for an activation."""
    return _config(data, where, activation_quantizer)


def weight_config(data: Any, where: str) -> Schema:
    """The typed config of ``{quantizer: <name>, <option>: ...}`` (or a bare name) for a weight."""
    return _config(data, where, weight_quantizer)


def config_to_dict(config: Schema) -> dict[str, Any]:
    """``{quantizer: <name>, **options}``: the inverse of :func:`activation_config` / :func:`weight_config`."""
    data: dict[str, Any] = {"quantizer": quantizer_of(config).name}
    data.update(to_builtins(config))
    return data


def _register_builtins() -> None:
    from builder.quant.centered import CenteredQuantizer
    from builder.quant.fwq import FwqQuantizer
    from builder.quant.gpfq import GpfqQuantizer
    from builder.quant.lowbit import LowBitQuantizer
    from builder.quant.none import NoneQuantizer
    from builder.quant.optq import OptqQuantizer
    from builder.quant.peg import PegQuantizer
    from builder.quant.rtn import RtnQuantizer
    from builder.quant.smooth import SmoothQuantizer
    from builder.quant.sparq import SparqQuantizer
    from builder.quant.static import StaticQuantizer

    for quantizer in (StaticQuantizer(), CenteredQuantizer(), FwqQuantizer(), PegQuantizer()):
        register_activation(quantizer)
    register_activation(SparqQuantizer())
    register_activation(LowBitQuantizer())  # plain b-bit activations: SPARQ's A4 baseline
    register_activation(SmoothQuantizer())  # SmoothQuant-style migration (decoders)
    register_activation(NoneQuantizer())  # float input of a weight-only GEMM (W4A16)
    register_weight(RtnQuantizer())
    register_weight(OptqQuantizer())  # OPTQ/GPTQ from the input Hessian, optional AXE
    register_weight(GpfqQuantizer())  # GPFQ from the quantized model's inputs, optional AXE


_register_builtins()
