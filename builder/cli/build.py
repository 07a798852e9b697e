"""CLI stage: ``build-engine build`` -- build (or reuse) a TensorRT / TensorRT-RTX engine with a manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.backends.options import BuildOptions

HELP = """Build a TensorRT or TensorRT-RTX engine from a (Q/DQ) ONNX graph.

MODEL is an .onnx file or an engine folder holding model.onnx (from `build-engine quantize`). The plan and
manifest.json are written atomically into the output folder; recipe.yaml and ranges.json lying next to the
model are hashed into the manifest. A re-run with unchanged inputs reuses the engine and says so.
"""

EPILOG = """\
examples:
  build-engine build engines/minilm-int8 --backend tensorrt-rtx --arch sm86,sm89 --batch 1,8,32 --seq 1,128,128
  build-engine build model.onnx -o engines/fp32 --backend tensorrt --opt-level 3 --timing-cache tc.bin
  build-engine build decoder.onnx -o engines/llama --batch 1,4,8 --seq 1,64,512 --past 0,128,1024
  build-engine build model.onnx --backend tensorrt --typing weak --int8-mode implicit \\
      --calibration-cache engines/x/calibration.cache

exit codes: 0 ok, 2 bad option or input, 4 build failed, 5 backend not installed
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX file, or an engine folder containing model.onnx")
    parser.add_argument("-o", "--output", type=Path, help="engine folder (default: MODEL's folder when MODEL is "
                        "a folder, else engines/<model stem>)")
    add_engine_arguments(parser.add_argument_group("engine"))
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    parser.add_argument("--print-config", action="store_true", help="print the resolved build options and exit")


DEFAULT_SEQ_MAX = 128


def add_engine_arguments(group: argparse._ArgumentGroup) -> None:
    """The engine flag group, shared by ``build`` and the one-shot pipeline."""
    group.add_argument("--backend", default="auto", help="auto | tensorrt | tensorrt-rtx (default: auto)")
    group.add_argument("--batch", default="1,8,32", help="batch min,opt,max of the profile (default: 1,8,32)")
    group.add_argument("--seq", help="sequence min,opt,max (default: 1,128,128, capped at the model's position "
                        "table less --past)")
    group.add_argument("--past", help="decoders with a KV cache: cache length min,opt,max, e.g. 0,128,1024 "
                        "(the attention mask gets past+seq)")
    group.add_argument("--workspace-mib", type=int, help="workspace memory limit in MiB")
    group.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default: 3)")
    group.add_argument("--timing-cache", help="timing cache file, read and updated (full TensorRT only)")
    group.add_argument("--arch", action="append", help="TensorRT-RTX target(s), e.g. sm86 or sm86,sm89 "
                        "(default: sm80,sm86,sm89,sm120)")
    group.add_argument("--typing", default="strong", choices=["strong", "weak"], help="network typing "
                        "(weak: TensorRT 10 only)")
    group.add_argument("--int8-mode", default="explicit", choices=["explicit", "implicit"],
                        help="explicit Q/DQ, or TensorRT 10's implicit INT8 fed from --calibration-cache")
    group.add_argument("--calibration-cache", help="TensorRT calibration cache for --int8-mode implicit "
                        "(default: calibration.cache next to the model)")
    group.add_argument("--layer-precision", action="append", default=[], metavar="PATTERN=DTYPE",
                        help="weakly typed TensorRT 10: pin layers matching PATTERN to fp32/fp16/bf16 (repeatable)")
    group.add_argument("--precision-list", type=Path, help="weakly typed TensorRT 10: node -> precision JSON from "
                        "`build-engine quantize` (default: precision.json next to the model, with --typing weak)")
    group.add_argument("--plugin-library", action="append", default=[], help="plugin shared library to load")
    group.add_argument("--plugin-module", action="append", default=[], help="Python module registering "
                        "Quickly Deployable Plugins (e.g. plugins.layernorm_quant.plugin)")


def default_seq(model_path: Path, past: int) -> str:
    """The default sequence range 1,128,128, capped at ``model_path``'s position table less ``past`` (a notice
    says so); unchanged when the graph shows no table or the table leaves no position (the build check then
    explains)."""
    from builder.engine.validate import position_table_rows
    from calib.errors import GraphError
    from calib.onnx_file import read_graph

    try:
        table = position_table_rows(read_graph(model_path))
    except GraphError:  # no file yet, or not ONNX: the stages that read it explain
        table = None
    rows = DEFAULT_SEQ_MAX + past if table is None else table[1]
    top = rows - past
    if top >= DEFAULT_SEQ_MAX or top < 1:
        return f"1,{DEFAULT_SEQ_MAX},{DEFAULT_SEQ_MAX}"
    print(f"--seq not given: the default 1,{DEFAULT_SEQ_MAX},{DEFAULT_SEQ_MAX} is capped at the model's {rows} "
          f"positions{f' less the past {past}' if past else ''}: 1,{top},{top}", flush=True)
    return f"1,{top},{top}"


def build_options(args: argparse.Namespace, model_path: Path, source_model: Path | None = None) -> BuildOptions:
    """BuildOptions from the engine flag group (side files looked up next to ``model_path``; the default
    sequence range fitted to ``source_model``'s position table, or ``model_path``'s)."""
    from builder.backends.options import (
        DEFAULT_RTX_ARCHITECTURES,
        BackendName,
        BuildOptions,
        DimRange,
        Int8Mode,
        LayerDtype,
        LayerPrecision,
        PluginSpec,
        ShapeProfile,
        Typing,
        precision_constraints,
    )
    from calib.errors import ConfigError

    precisions = []
    for item in args.layer_precision:
        pattern, sep, dtype = item.rpartition("=")
        if not sep or dtype not in {d.value for d in LayerDtype}:
            raise ConfigError(f"--layer-precision {item!r} is not PATTERN=fp32|fp16|bf16")
        precisions.append(LayerPrecision(pattern=pattern, dtype=LayerDtype(dtype)))
    precision_file = args.precision_list
    if precision_file is None and args.typing == "weak" and (model_path.parent / "precision.json").is_file():
        precision_file = model_path.parent / "precision.json"
    if precision_file is not None:
        if not precision_file.is_file():
            raise ConfigError(f"precision list {str(precision_file)!r} does not exist")
        precisions.extend(precision_constraints(json.loads(precision_file.read_text(encoding="utf-8"))))
    archs = [a for item in (args.arch or []) for a in item.split(",") if a.strip()] or DEFAULT_RTX_ARCHITECTURES
    past = DimRange.parse(args.past, "--past", minimum=0) if args.past else None
    seq = args.seq or default_seq(source_model or model_path, past.max if past is not None else 0)
    cache = args.calibration_cache
    if cache is None and args.int8_mode == "implicit" and (model_path.parent / "calibration.cache").is_file():
        cache = str(model_path.parent / "calibration.cache")
    return BuildOptions(
        backend=BackendName.parse(args.backend),
        profiles=(ShapeProfile(batch=DimRange.parse(args.batch, "--batch"), seq=DimRange.parse(seq, "--seq"),
                               past=past),),
        workspace_mib=args.workspace_mib,
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        architectures=tuple(archs),
        typing=Typing(args.typing),
        int8_mode=Int8Mode(args.int8_mode),
        calibration_cache=cache,
        layer_precisions=tuple(precisions),
        plugins=tuple(PluginSpec(library=p) for p in args.plugin_library)
        + tuple(PluginSpec(module=m) for m in args.plugin_module),
    )


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir
    from builder.engine.build import MODEL_FILE, BuildInputs, build_engine_dir
    from calib.errors import ConfigError

    model_path: Path = args.model
    if model_path.is_dir():
        model_path = model_path / MODEL_FILE
        default_out = args.model
    else:
        default_out = Path("engines") / model_path.stem
    if not model_path.is_file():
        raise ConfigError(f"model {str(model_path)!r} does not exist")
    options = build_options(args, model_path)
    if args.print_config:
        print(json.dumps(options.to_dict(), indent=2, sort_keys=True))
        return 0
    out_dir: Path = args.output or default_out
    with claim_output_dir(out_dir, "build", parents=args.output is None):  # the default engines/<stem> may be new
        outcome = build_engine_dir(BuildInputs.beside(model_path), options, out_dir, force=args.force)
    manifest = outcome.manifest
    if outcome.reused:
        print(f"reusing engine {outcome.plan_path} (inputs unchanged; --force rebuilds)")
    else:
        print(
            f"built {outcome.plan_path} with {manifest.backend} {manifest.backend_version} for "
            f"{','.join(manifest.architectures)} in {manifest.build_time_s:.2f} s ({manifest.plan_bytes} bytes)"
        )
    return 0
