"""CLI stage: ``build-engine evaluate`` -- accuracy of a (quantized) model against its FP32 reference."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from builder.evaluate.evaluate import EvalData

HELP = """\
Measure how close a quantized model stays to its FP32 reference, on ONNX Runtime (CPU). Works for any model.

Every float output (or those named with --output) is compared with FP32 on held-out data: cosine per vector,
relative and max-abs error, and for logits the top-1 agreement and KL divergence. Task figures are added
where they apply, and the report says why the others were skipped:
  sentence encoders (a pooled embedding output, or last_hidden_state pooled with the attention mask):
    cosine of the embeddings on the VADER movie-sentence test split, a logistic-regression probe (sign of
    the human rating; fitted on FP32 embeddings of the train split, and refitted on the model's own) and
    Spearman correlation on gensim's Lee rated document pairs;
  causal language models (a 'logits' [batch, seq, vocab] output): perplexity over fixed non-overlapping
    windows of held-out text, next-token top-1 agreement and KL to FP32, and with a KV-cache graph
    (past_key_values.* inputs, present.* outputs) greedy generation from a few prompts plus a check that
    the cached path's logits equal the full-sequence path's.
Also the share of GEMM FLOPs that runs in INT8 and a per-layer table of the residual stream's error.

The tokenizer is found next to the model or the reference (tokenizer.json or a Hugging Face folder) or
given with --tokenizer; the bundled MiniLM tokenizer only serves the bundled MiniLM. Its ids are checked
against the model's embedding table before anything runs. The FP32 outputs are cached (an .npz under
--cache-dir, by default beside the -o report), so a re-run does not recompute them.
Calibration text is never used here. Plugin-variant graphs run through the plugins' NumPy references.
"""

EPILOG = """\
examples:
  build-engine evaluate engines/minilm-int8/model.onnx --reference minilm.onnx
  build-engine evaluate q.onnx --reference fp32.onnx --test-samples 2000 --no-refit -o report.json
  build-engine evaluate q.onnx --reference fp32.onnx --tokenizer hf-model-folder --input-map tokens=ids
  build-engine evaluate int8/model.onnx --reference smollm2/model.onnx --text shakespeare --window 512 \\
      --windows 8 --new-tokens 16 -o engines/smollm2-int8/report.json
  build-engine evaluate q.onnx --reference fp32.onnx --output logits --text my_corpus.txt

exit codes: 0 ok, 2 missing file, bad flag or tokenizer/model mismatch, 3 unreadable model or unusable data,
5 missing optional package
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the ONNX model to evaluate (Q/DQ, fallback or plugin variant)")
    parser.add_argument("--reference", type=Path, required=True, metavar="FP32.onnx", help="the FP32 model")
    parser.add_argument(
        "--graph-report", type=Path, metavar="JSON", help="GraphReport of the FP32 model (default: analyze it)"
    )
    parser.add_argument("-o", "--json", type=Path, metavar="JSON", help="write the AccuracyReport here")
    parser.add_argument("--output", action="append", default=[], metavar="NAME",
                        help="compare only this model output (repeatable; default: every float output)")
    parser.add_argument("--tokenizer", type=Path, metavar="PATH",
                        help="tokenizer.json or Hugging Face tokenizer folder (default: found next to the model)")
    parser.add_argument("--input-map", action="append", default=[], metavar="ROLE=INPUT",
                        help="map a text role (tokens, mask, token_types, positions) to a model input name, "
                             "e.g. tokens=ids,mask=am (default: inferred from the usual names)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="cache of FP32 reference outputs (default: <report folder>/eval-cache with -o)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    parser.add_argument("--name", help="model name in the report (default: the parent folder or file name)")
    sentence = parser.add_argument_group("sentence encoders")
    sentence.add_argument("--test-samples", type=int, metavar="N", help="use the first N test sentences (default all)")
    sentence.add_argument("--train-samples", type=int, metavar="N", help="use the first N probe train sentences")
    sentence.add_argument("--layer-sentences", type=int, default=256, metavar="N",
                          help="sentences for the per-layer table and the output comparison (256)")
    sentence.add_argument("--no-refit", action="store_true", help="skip the probe refitted on the model's embeddings")
    sentence.add_argument("--seed", type=int, default=0, help="seed of the VADER split (must match calibration's)")
    language = parser.add_argument_group("language models")
    language.add_argument("--text", default="shakespeare", metavar="SOURCE",
                          help="held-out text: shakespeare, lee or a .txt/.jsonl file (its last quarter of "
                               "documents; the first three quarters are the calibration slice)")
    language.add_argument("--window", type=int, default=512, metavar="TOKENS", help="tokens per window (512)")
    language.add_argument("--windows", type=int, default=8, metavar="N", help="perplexity windows (8)")
    language.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                          help="greedy-generation prompt (repeatable; default: four built-in prompts)")
    language.add_argument("--new-tokens", type=int, default=16, metavar="N", help="tokens generated per prompt (16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (phases still logged with -v)")


def _check_counts(args: argparse.Namespace) -> None:
    from calib.errors import ConfigError

    for flag in ("test_samples", "train_samples", "layer_sentences", "windows", "new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive count, got {value}")
    if args.train_samples is not None and args.train_samples < 20:
        raise ConfigError(f"--train-samples {args.train_samples} is too few to fit the probe; use at least 20")
    if args.window < 2:
        raise ConfigError(f"--window {args.window} must be at least 2 tokens")


def _model_name(path: Path) -> str:
    return path.parent.name if path.name == "model.onnx" and path.parent.name else path.stem


class BarProgress:
    """The CLI's progress: a tqdm bar per phase on stderr, and a closing line with its duration."""

    def __init__(self, file: Any = None) -> None:
        self.file = sys.stderr if file is None else file

    @contextmanager
    def phase(self, desc: str, total: int | None = None, unit: str = "batch") -> Iterator[Callable[[int], None]]:
        from tqdm import tqdm

        started = time.perf_counter()
        bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, leave=False, dynamic_ncols=True)
        def step(count: int) -> None:
            bar.update(count)

        try:
            yield step
        finally:
            bar.close()
        print(f"{desc}: done in {time.perf_counter() - started:.1f} s", file=self.file, flush=True)


def eval_data_from_args(args: argparse.Namespace) -> EvalData:
    """The evaluation data and settings the flags describe."""
    from builder.evaluate.evaluate import DEFAULT_PROMPTS, load_eval_data

    return load_eval_data(seed=args.seed, train_limit=args.train_samples, test_limit=args.test_samples,
                          layer_sentences=args.layer_sentences, outputs=tuple(args.output), text_source=args.text,
                          window=args.window, windows=args.windows,
                          prompts=tuple(args.prompt) or DEFAULT_PROMPTS, new_tokens=args.new_tokens)


def cache_folder(args: argparse.Namespace) -> Path | None:
    """Where the FP32 reference is cached: --cache-dir, else beside the -o report, else nowhere."""
    if args.no_cache:
        return None
    if args.cache_dir is not None:
        return Path(args.cache_dir)
    return None if args.json is None else args.json.parent / "eval-cache"


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from builder.cli.lock import claim_output_file
    from builder.engine.outputs import check_output_dir

    with ExitStack() as outputs:  # checked (and the report's folder locked) before any work
        if args.json is not None:
            outputs.enter_context(claim_output_file(args.json, "evaluate"))
        cache = cache_folder(args)
        if cache is not None:
            check_output_dir(cache, parents=True)
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from builder.evaluate.evaluate import evaluate, prepare_reference
    from builder.evaluate.progress import Progress
    from builder.evaluate.render import format_accuracy
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.graph.report import GraphReport
    from calib.artifact_io import atomic_write_text, sha256_file
    from calib.errors import ConfigError
    from calib.model_inputs import parse_input_map

    _check_counts(args)
    for path, what in ((args.model, "model"), (args.reference, "reference model")):
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist")
    if args.graph_report is not None and not args.graph_report.is_file():
        raise ConfigError(f"GraphReport file {args.graph_report} does not exist")
    encoder = model_text_encoder(args.model, args.tokenizer, parse_input_map(args.input_map),
                                 reference=args.reference)  # checked before any model runs
    data = eval_data_from_args(args)
    progress = Progress() if args.no_progress else BarProgress()
    with progress.phase("loading the models", total=None):
        reference = load_model(args.reference)
        model = load_model(args.model)
    if args.graph_report is not None:
        report = GraphReport.from_json(args.graph_report.read_text(encoding="utf-8"))
    else:
        with progress.phase("analyzing the reference graph", total=None):
            report = analyze(reference, name=args.reference.stem)
    cache = cache_folder(args)
    ref = prepare_reference(reference, data, encoder=encoder, cache_dir=cache,
                            model_sha256=sha256_file(args.reference), progress=progress)
    if ref.reused:
        print(f"FP32 reference reused from {ref.cache_file}", file=sys.stderr)
    name = args.name or _model_name(args.model)
    result = evaluate(reference, model, report, data, ref, name=name, refit=not args.no_refit, progress=progress)
    print(format_accuracy(result), end="")
    if args.json is not None:
        atomic_write_text(args.json, result.to_json())
        print(f"wrote {args.json}")
    return 0
