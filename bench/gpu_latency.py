"""Benchmark: MiniLM encoder latency on an NVIDIA GPU (batch 1, 8, 32 at sequence 128, FP32 and FP16).

Runs ONNX Runtime's CUDA execution provider on the exported graph when onnxruntime-gpu is installed, and
PyTorch eager on the same weights in every case (the peer a deployment engineer starts from). Timing uses
CUDA events around the forward pass after a warm-up; host-to-device and device-to-host copies are timed
apart. Prints a table and writes JSON. Needs a GPU; exits with a message otherwise.

    python -m bench.gpu_latency [--model-dir DIR] [--iterations 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 8, 32)
SEQ = 128
TEXT = (
    "The engine builder calibrates on real sentences, places quantize and dequantize nodes where the "
    "runtime fuses them, keeps sensitive layers in half precision and reports what it did. "
)


def _percentiles(times_ms: list[float]) -> dict[str, float]:
    arr = np.sort(np.asarray(times_ms))
    return {
        "mean_ms": float(arr.mean()),
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "runs": len(times_ms),
    }


def _token_batch(model_dir: Path, batch: int) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ)
    ids = tok.encode(TEXT * 8).ids
    if len(ids) < SEQ:
        raise SystemExit(f"tokenized text has {len(ids)} tokens, fewer than {SEQ}")
    input_ids = np.tile(np.asarray(ids[:SEQ], dtype=np.int64), (batch, 1))
    return input_ids, np.ones_like(input_ids)


def _time_cuda(fn: Any, iterations: int, warmup: int = 20) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def torch_eager(model_dir: Path, iterations: int) -> list[dict[str, Any]]:
    """PyTorch eager latency of the encoder body + pooling, FP32 and FP16."""
    import torch
    import transformers

    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
        model = model.to(device="cuda", dtype=dtype).eval()
        for batch in BATCHES:
            ids, mask = _token_batch(model_dir, batch)
            ids_d, mask_d = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()

            def forward(i: Any = ids_d, m: Any = mask_d, mdl: Any = model) -> Any:
                with torch.inference_mode():
                    hidden = mdl(input_ids=i, attention_mask=m).last_hidden_state
                    return hidden.mean(dim=1)

            stats = _percentiles(_time_cuda(forward, iterations))
            rows.append({"runtime": "torch-eager", "precision": dtype_name, "batch": batch, "seq": SEQ, **stats})
        del model
        torch.cuda.empty_cache()
    return rows


def ort_cuda(model_dir: Path, iterations: int, work: Path) -> list[dict[str, Any]]:
    """ONNX Runtime CUDA EP latency of the exported graph (device compute via IO binding), FP32 and FP16."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"ONNX Runtime {ort.__version__} has no CUDA provider ({ort.get_available_providers()}); skipped")
        return []
    import torch

    from builder.intake.export import export_sentence_encoder

    fp32_path = work / "minilm-fp32.onnx"
    export_sentence_encoder(model_dir, fp32_path)
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ships with onnxruntime

    fp16 = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    fp16_path = work / "minilm-fp16.onnx"
    onnx.save(fp16, str(fp16_path))
    rows = []
    for precision, path in (("fp32", fp32_path), ("fp16", fp16_path)):
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        for batch in BATCHES:
            ids, mask = _token_batch(model_dir, batch)
            binding = session.io_binding()
            binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, "cuda", 0))
            binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask, "cuda", 0))
            binding.bind_output("sentence_embedding", "cuda")
            stats = _percentiles(_time_cuda(lambda b=binding, s=session: s.run_with_iobinding(b), iterations))
            rows.append({"runtime": "onnxruntime-cuda", "precision": precision, "batch": batch, "seq": SEQ, **stats})
        torch.cuda.synchronize()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="folder with config.json, safetensors and tokenizer.json")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path("engines/bench/gpu_latency.json"))
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed; GPU latency benchmark skipped")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU; GPU latency benchmark skipped")
        return 0
    model_dir = args.model_dir
    if model_dir is None:
        from builder.intake.minilm import minilm_model_dir

        model_dir = minilm_model_dir()
    with tempfile.TemporaryDirectory() as work:
        rows = ort_cuda(model_dir, args.iterations, Path(work)) + torch_eager(model_dir, args.iterations)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device: {result['device']}  (CUDA-event timing, {args.iterations} runs after warm-up)")
    print(f"{'runtime':18} {'prec':5} {'batch':>5} {'seq':>4} {'mean ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['runtime']:18} {r['precision']:5} {r['batch']:>5} {r['seq']:>4} {r['mean_ms']:8.3f} "
              f"{r['p50_ms']:8.3f} {r['p90_ms']:8.3f} {r['p99_ms']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
