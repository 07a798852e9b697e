"""CLI stage: ``build-engine export-triton`` -- an engine folder -> a Triton model repository entry."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """Export a built engine into a Triton Inference Server model repository.

Writes <repo>/<model>/config.pbtxt (platform tensorrt_plan; inputs, outputs, dtypes and dims from the
engine's manifest.json; max_batch_size, dynamic batching, instance groups) and <repo>/<model>/1/model.plan.
Plugin libraries are copied next to the model and the server flag that loads them is printed. Export is
idempotent; a different model of the same name is replaced only with --force.
"""

EPILOG = """\
examples:
  build-engine export-triton engines/minilm-int8 --repo model_repository --max-batch 32 --instances 2
  build-engine export-triton engines/minilm-int8 --repo model_repository --name minilm --force
  build-engine export-triton engines/minilm-int8 --repo model_repository --tokenizer tokenizer.json

exit codes: 0 ok, 2 bad input (no manifest, unknown dtype, repository is a file, name taken), 4 engine damaged
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", type=Path, help="engine folder holding manifest.json and the plan")
    parser.add_argument("--repo", type=Path, required=True, help="Triton model repository folder")
    parser.add_argument("--name", help="model name in the repository (default: the engine folder's name)")
    parser.add_argument("--max-batch", type=int, help="max_batch_size (default: the engine profile's max batch)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per GPU (default: 1)")
    parser.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batching queue delay")
    parser.add_argument("--cuda-graphs", action="store_true", help="enable CUDA graphs in the config")
    parser.add_argument("--force", action="store_true", help="replace a different model of the same name")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json: also export <model>_tokenizer (Python "
                        "backend) and the ensemble <model>_text so clients can send raw text")
    parser.add_argument("--max-length", type=int, help="tokenizer padding length (default: engine's max sequence)")


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir
    from builder.serve.config import TritonOptions
    from builder.serve.export import export_triton

    options = TritonOptions(
        model_name=args.name or args.engine.resolve().name,
        max_batch=args.max_batch,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        cuda_graphs=args.cuda_graphs,
    )
    with claim_output_dir(args.repo, "export-triton"):  # checked and locked before any work
        result = export_triton(args.engine, args.repo, options, force=args.force, tokenizer=args.tokenizer,
                               max_length=args.max_length)
    print(f"{result.status.value}: {result.model_dir}")
    for extra in result.extra_models:
        print(f"also: {args.repo / extra}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
