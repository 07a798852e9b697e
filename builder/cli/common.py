"""CLI stage: flag groups shared by several subcommands and the settings they map onto.

Each group adds kebab-case flags that map one-to-one onto a dataclass (``--calib-data`` -> ``CalibSettings.data``);
the subcommands only call :func:`add_calib_data_arguments` / :func:`calib_settings` and friends. The weight
group (``--weights``, ``--weight-bits`` ...) maps onto one last recipe rule (:func:`weight_flags`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.cli.steps import CalibSettings
    from builder.graph.report import GraphReport
    from builder.recipes.model import Recipe
    from calib.ranges import RangeSpec


AUTO_DATA, SENTENCE_DATA, TEXT_DATA = "auto", "vader", "shakespeare"  # --calib-data auto picks one of the two


def add_calib_data_arguments(group: argparse._ArgumentGroup) -> None:
    """Where calibration text comes from and how it is batched (read by :func:`calib_settings`)."""
    group.add_argument("--calib-data", "--data", dest="calib_data", default=AUTO_DATA,
                       help="vader or lee (sentences), shakespeare (passages), or a .txt/.jsonl file; auto: "
                            "shakespeare for a language model (a KV cache or a [batch, seq, vocab] logits output), "
                            "vader otherwise (default: auto)")
    group.add_argument("--samples", type=int, default=512, help="calibration texts (default: 512)")
    group.add_argument("--seed", type=int, default=0, help="data split and shuffle seed (default: 0)")
    group.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    group.add_argument("--max-length", type=int, default=128, help="tokens per text at most (default: 128)")
    group.add_argument("--tokenizer", type=Path, metavar="PATH",
                       help="tokenizer.json or Hugging Face tokenizer folder (default: found next to the model; the "
                            "bundled MiniLM's for the bundled MiniLM)")
    group.add_argument("--input-map", action="append", default=[], metavar="ROLE=INPUT",
                       help="model input names by role, e.g. tokens=ids,mask=am (roles: tokens, mask, token_types, "
                            "positions; default: inferred from the names)")


def add_range_view_arguments(group: argparse._ArgumentGroup) -> None:
    """The range method of the ``ranges.json`` / ``calibration.cache`` views (recipes decide their own)."""
    group.add_argument("--method", default="max", choices=("max", "percentile", "entropy", "mse"),
                       help="range method of ranges.json and calibration.cache, the views for people and TensorRT; "
                            "every recipe decides its own ranges from the same statistics (default: max)")
    group.add_argument("--percentile", type=float, help="percentile for --method percentile (e.g. 99.99)")


def calib_data_for(data: str, model: Path) -> str:
    """``data`` with ``auto`` resolved for ``model``: ``shakespeare`` (running text) for a language model -- KV-cache
    inputs, or a rank-3 output whose name contains ``logits`` -- else ``vader`` (single sentences, what sentence
    encoders see). A model that cannot be read resolves to ``vader``; the step that opens it reports why."""
    import onnx
    from google.protobuf.message import DecodeError

    from calib.errors import CalibrationError
    from calib.model_inputs import model_inputs

    if data != AUTO_DATA:
        return data
    try:
        graph = onnx.load(str(model), load_external_data=False)  # structure only
        cache = model_inputs(graph).cache
    except (OSError, ValueError, RuntimeError, DecodeError, CalibrationError):
        return SENTENCE_DATA
    logits = any("logits" in o.name.lower() and len(o.type.tensor_type.shape.dim) == 3 for o in graph.graph.output)
    return TEXT_DATA if cache or logits else SENTENCE_DATA


def calib_settings(args: argparse.Namespace) -> CalibSettings:
    """The CalibSettings of the ``calibration data`` flag group (and ``--bins`` where a command has it), with
    ``--calib-data auto`` resolved for ``args.model`` (:func:`calib_data_for`)."""
    from builder.cli.steps import CalibSettings
    from calib.histogram import DEFAULT_BINS

    return CalibSettings(data=calib_data_for(args.calib_data, Path(args.model)), samples=args.samples,
                         seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                         tokenizer=args.tokenizer, input_map=tuple(args.input_map),
                         bins=getattr(args, "bins", DEFAULT_BINS))


def range_view_spec(args: argparse.Namespace) -> RangeSpec:
    """The calib.ranges.RangeSpec of ``--method`` / ``--percentile``."""
    from calib.range_table import RangeMethod
    from calib.ranges import RangeSpec

    return RangeSpec(method=RangeMethod(args.method), percentile=args.percentile)


WEIGHT_METHODS = ("rtn", "optq", "gpfq")
# flag -> (option of the weight config, the quantizers that take it)
_WEIGHT_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "weight_bits": ("bits", WEIGHT_METHODS), "weight_block": ("block", WEIGHT_METHODS),
    "weight_scale": ("scale", WEIGHT_METHODS), "act_order": ("act_order", ("optq", "gpfq")),
    "percdamp": ("percdamp", ("optq",)), "first_token_weight": ("first_token_weight", ("optq",)),
    "accumulator_bits": ("accumulator_bits", ("optq", "gpfq")),
    "activation_bits": ("activation_bits", ("optq", "gpfq")), "tile": ("tile", ("optq", "gpfq")),
    "axe_strict_only": ("soft", ("optq", "gpfq")),
}


def add_weight_arguments(group: argparse._ArgumentGroup) -> None:
    """The weight quantizer of every INT8 weight GEMM, on top of any recipe (read by :func:`weight_flags`)."""
    group.add_argument("--weights", choices=WEIGHT_METHODS,
                       help="weight quantizer of every INT8 weight GEMM: rtn (round to nearest), optq (OPTQ/GPTQ from "
                            "the input Hessians: one more pass over the calibration data), gpfq (GPFQ from the "
                            "quantized model's inputs, layer by layer); default: the recipe's")
    group.add_argument("--weight-bits", type=int, metavar="M", help="weight bits 2..8 (default: the recipe's)")
    group.add_argument("--weight-block", type=int, metavar="B",
                       help="one scale per block of B inputs, stored as INT4 with block-wise DequantizeLinear (opset "
                            "21; bits <= 4; W4A16 engines); 0: one scale per output channel, stored as INT8; default: "
                            "the recipe's")
    group.add_argument("--weight-scale", choices=("max", "mse", "auto"),
                       help="weight scales: max, mse or auto (optq: mse, or max with --accumulator-bits; others: "
                            "max) (default: the recipe's when it uses the same quantizer, else the quantizer's)")
    group.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                       help="optq/gpfq: visit inputs by descending Hessian diagonal (default: on for optq, off for "
                            "gpfq)")
    group.add_argument("--percdamp", type=float, help="optq: Hessian damping, a share of its mean diagonal (0.01)")
    group.add_argument("--first-token-weight", type=float, metavar="W",
                       help="optq: count each calibration text's first token W times in the Hessian (every later "
                            "token attends to it; decoders' attention sink) (default: the recipe's, else 1)")
    group.add_argument("--accumulator-bits", type=int, metavar="P",
                       help="optq/gpfq with AXE: no input in range overflows a signed P-bit accumulator")
    group.add_argument("--activation-bits", type=int, metavar="N",
                       help="AXE: bits of the signed integer activations the accumulator sees (default 8)")
    group.add_argument("--tile", type=int, metavar="T",
                       help="AXE: inputs per P-bit accumulator (multi-stage accumulation; default all of K)")
    group.add_argument("--axe-strict-only", action="store_true",
                       help="AXE: the strict running clamp only, without the soft L1 projection")
    group.add_argument("--weight-only", action="store_true",
                       help="leave the inputs of those GEMMs in float (activation quantizer none): W4A16 / W8A16 "
                            "weight-only GEMMs, e.g. --weights optq --weight-bits 4 --weight-block 128 --weight-only")


@dataclass(frozen=True)
class WeightFlags:
    """``--weights`` and its options as given (``options``: config option -> value); see :meth:`apply`."""

    method: str
    options: tuple[tuple[str, object], ...]
    label: str  # the flags as typed, for the rule's note
    weight_only: bool = False  # the GEMM inputs stay float (activation quantizer none)

    def apply(self, recipe: Recipe, report: GraphReport) -> Recipe:
        """``recipe`` with a last rule giving every INT8 weight GEMM this weight quantizer. ``bits`` and ``block``
        not given on the command line are the recipe's own, when all its INT8 weight GEMMs agree on them (so
        ``--recipe w4a16 --weights optq`` stays 4-bit in blocks of 128), and so is ``scale`` when the recipe uses
        the same quantizer (else the quantizer's default: OPTQ's ``auto``, not RTN's ``max``); ``--weight-block
        0``: per channel.

        With ``--weight-only`` the rule also makes the weight GEMMs quantized (integer weights, float inputs: W4A16 /
        W8A16), on a float32 recipe (an FP16-converted one takes no quantized GEMM); the LM head joins them only
        where the recipe already quantizes it (a float LM head is the usual weight-only choice). Without it, a
        recipe that quantizes no weight GEMM is an error rather than a silent no-op."""
        from builder.graph.report import Role
        from builder.quant.none import NoneConfig
        from builder.quant.registry import quantizer_of, weight_config
        from builder.recipes.model import WEIGHT_GEMM_ROLES, Precision, Rule, Selector, Settings
        from builder.recipes.resolve import resolve
        from calib.errors import ConfigError

        given = dict(self.options)
        resolved = resolve(recipe, report, () if any(r.select.flagged for r in recipe.rules) else None)
        quantized = [n for n in resolved.values()
                     if n.settings.precision == Precision.INT8 and n.assignment.role in WEIGHT_GEMM_ROLES]
        if recipe.model_dtype != Precision.FP32:
            raise ConfigError(f"recipe {recipe.name!r} converts the whole model to {recipe.model_dtype.value}, which "
                              "takes no quantized GEMM; weight quantizers start from a float32 recipe, e.g. --recipe "
                              f"int8-gemm {self.label} (with --weight-only, every INT8 GEMM of it becomes weight-only)")
        if not quantized and not self.weight_only:
            raise ConfigError(f"recipe {recipe.name!r} quantizes no weight GEMM of this model, so {self.label} would "
                              "change nothing; add --weight-only for weight-only GEMMs (integer weights, float "
                              "inputs: W4A16 / W8A16), or use a recipe with INT8 GEMMs (e.g. int8-gemm)")
        # a scale is a quantizer's own choice (RTN's max is not OPTQ's auto): inherited only from the same quantizer
        same = all(n.settings.weight is not None and quantizer_of(n.settings.weight).name == self.method
                   for n in quantized)
        inherited = _INHERITED if same else tuple(k for k in _INHERITED if k != "scale")
        bases = {tuple(getattr(n.settings.weight, k, None) for k in inherited) for n in quantized}
        unset = [k for k in inherited if k not in given]
        if len(bases) > 1 and unset:
            raise ConfigError(f"recipe {recipe.name!r} gives its INT8 weight GEMMs different weight "
                              f"{'/'.join(unset)} ({sorted(map(str, bases))}); say which with --weight-bits, "
                              "--weight-block, --weight-scale")
        if len(bases) == 1:
            base = dict(zip(inherited, next(iter(bases)), strict=True))
            given = {k: v for k, v in base.items() if k in unset and v is not None} | given
        if given.get("block") == 0:
            given["block"] = None
        config = weight_config({"quantizer": self.method, **given}, "--weights")
        roles = set(WEIGHT_GEMM_ROLES)
        if self.weight_only and not any(n.assignment.role == Role.LM_HEAD for n in quantized):
            roles.discard(Role.LM_HEAD)
        settings = (Settings(precision=Precision.INT8, weight=config, activation=NoneConfig()) if self.weight_only
                    else Settings(weight=config))
        return recipe.with_rules((Rule(select=Selector(roles=tuple(sorted(roles, key=lambda r: r.value)),
                                                       optional=True),
                                       set=settings, note=f"weight quantizer from the command line: {self.label}"),))


_INHERITED = ("bits", "block", "scale")
_SWITCHES = ("axe_strict_only",)  # store_true flags: absent is False, not a choice


def weight_flags(args: argparse.Namespace) -> WeightFlags | None:
    """The weight flags of ``args`` (None without ``--weights``; other weight flags without it are an error)."""
    from builder.quant.registry import weight_config
    from calib.errors import ConfigError

    given = {flag: getattr(args, flag) for flag in _WEIGHT_FLAGS
             if getattr(args, flag, None) is not None and not (flag in _SWITCHES and getattr(args, flag) is False)}
    method = getattr(args, "weights", None)
    weight_only = bool(getattr(args, "weight_only", False))
    if method is None:
        if weight_only:
            given["weight_only"] = True
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')} needs --weights {'|'.join(WEIGHT_METHODS)}")
        return None
    options: list[tuple[str, object]] = []
    for flag, value in given.items():
        option, takers = _WEIGHT_FLAGS[flag]
        if method not in takers:
            raise ConfigError(f"--{flag.replace('_', '-')} is an option of {' and '.join(takers)}, not --weights "
                              f"{method}")
        options.append((option, False if flag == "axe_strict_only" else value))
    label = " ".join([f"--weights {method}", *(f"--{f.replace('_', '-')} {v}" for f, v in given.items())])
    if weight_only and "accumulator_bits" in dict(options):
        raise ConfigError("--accumulator-bits bounds an integer GEMM's accumulator; --weight-only GEMMs read float "
                          "inputs (drop one of them)")
    label += " --weight-only" if weight_only else ""
    flags = WeightFlags(method=method, options=tuple(options), label=label, weight_only=weight_only)
    weight_config({"quantizer": method, **{k: (None if k == "block" and v == 0 else v) for k, v in options}},
                  "--weights")  # bits, P and the like fail here, before the model is read
    return flags
