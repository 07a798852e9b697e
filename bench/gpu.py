"""Benchmark (``make bench-gpu``): the fused plugin kernels on a GPU against PyTorch and the copy bandwidth.

For each shape (fp16 inputs) one run measures:

* our Triton kernel, and its agreement with the NumPy reference (INT8 codes, per-token scales);
* PyTorch eager and ``torch.compile`` of the same function (LayerNorm or softmax in float32, then
  ``clamp(round(y / scale))`` to int8, round half to even);
* a device copy of the input (``torch.empty_like(x).copy_(x)``): bytes read + written over time is the
  bandwidth ceiling the kernel is held to (target: >= 80% of it, and faster than ``torch.compile``).

Timing: every contender runs on its own rotation of input copies (>= 256 MB in all, so L2 serves nothing),
all calls captured in one CUDA graph (no Python launch overhead in the numbers); median of the replays.

Kernel bandwidth counts the fewest bytes the op must move: inputs read once, outputs written once.
Results go to a JSON file (``--out``, default ``bench-gpu.json``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

LN_SHAPES: tuple[tuple[int, int], ...] = ((8192, 768), (32768, 1024), (16384, 4096))
SM_SHAPES: tuple[tuple[int, int, int], ...] = ((96, 128, 128), (192, 512, 512))
EPS = 1e-12
TARGET_COPY_FRACTION = 0.8


@dataclass(frozen=True, kw_only=True)
class Row:
    op: str
    shape: str
    kernel_us: float
    eager_us: float
    compile_us: float
    copy_us: float
    kernel_gbs: float
    copy_gbs: float
    exact_fraction: float
    max_step_diff: int
    scale_max_ulp: int

    @property
    def copy_fraction(self) -> float:
        return self.kernel_gbs / self.copy_gbs

    @property
    def meets_target(self) -> bool:
        return self.copy_fraction >= TARGET_COPY_FRACTION and self.kernel_us < self.compile_us


def _log(row: Row) -> Row:
    print(f"measured {row.op} {row.shape}: ours {row.kernel_us:.1f} us, compile {row.compile_us:.1f} us, "
          f"copy {row.copy_us:.1f} us, exact {row.exact_fraction:.6f}", flush=True)
    return row


ROTATE_BYTES = 256 << 20  # inputs rotated through per timing: several times the 50 MB L2 of an H100


def _copies(x: Any, count: int) -> list[Any]:
    return [x] + [x.clone() for _ in range(count - 1)]


def _rotation(nbytes: int) -> int:
    return max(2, min(64, -(-ROTATE_BYTES // nbytes)))


def _graph_us(torch: Any, calls: list[Callable[[], Any]], replays: int = 25) -> float:
    """Median device time of one call: all ``calls`` (each on its own input buffers, so nothing is served from
    L2) are captured in one CUDA graph, which removes Python launch overhead, and the graph is replayed."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # warm-up: compilation, autotuning, allocator growth
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    torch.cuda.synchronize()
    return float(statistics.median(times))


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.max(np.abs(ia - ib))) if ia.size else 0


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    return float(np.mean(diff == 0)), int(diff.max())


def _ln_case(torch: Any, tokens: int, hidden: int, per_token: bool) -> Row:
    import torch.nn.functional as F

    from plugins.layernorm_quant import reference
    from plugins.layernorm_quant.kernel import layernorm_quantize

    gen = torch.Generator(device="cuda").manual_seed(tokens + hidden)
    x = (torch.randn(tokens, hidden, device="cuda", generator=gen) * 2 + 0.5).half()
    gamma = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).half()
    beta = (torch.randn(hidden, device="cuda", generator=gen) * 0.1).half()
    scale = 4.0 / 127

    def torch_fn(x: Any, g: Any, b: Any) -> Any:
        y = F.layer_norm(x.float(), (hidden,), g.float(), b.float(), EPS)
        s = y.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127 if per_token else scale
        return torch.clamp(torch.round(y / s), -128, 127).to(torch.int8)

    compiled = torch.compile(torch_fn, dynamic=False)
    q, tok, _ = layernorm_quantize(x, gamma, beta, epsilon=EPS, scale=scale, per_token=per_token)
    torch.cuda.synchronize()
    want_q, want_tok, _ = reference.layernorm_quantize(
        x.cpu().numpy(), gamma.cpu().numpy(), beta.cpu().numpy(), epsilon=EPS, scale=scale, per_token=per_token)
    exact, max_diff = _compare(q.cpu().numpy(), want_q)
    ulp = _ulp_diff(tok.cpu().numpy(), want_tok) if per_token and tok is not None and want_tok is not None else 0
    xs = _copies(x, _rotation(x.numel() * x.element_size()))
    kernel_us = _graph_us(torch, [
        lambda x=x: layernorm_quantize(x, gamma, beta, epsilon=EPS, scale=scale, per_token=per_token) for x in xs])
    eager_us = _graph_us(torch, [lambda x=x: torch_fn(x, gamma, beta) for x in xs])
    compile_us = _graph_us(torch, [lambda x=x: compiled(x, gamma, beta) for x in xs])
    copy_us = _graph_us(torch, [lambda x=x: torch.empty_like(x).copy_(x) for x in xs])
    nbytes = x.numel() * (2 + 1) + 4 * hidden + (4 * tokens if per_token else 0)
    return Row(op="LN+quant" + (" per-token" if per_token else ""), shape=f"{tokens}x{hidden}",
               kernel_us=kernel_us, eager_us=eager_us, compile_us=compile_us, copy_us=copy_us,
               kernel_gbs=nbytes / kernel_us / 1e3, copy_gbs=2 * x.numel() * 2 / copy_us / 1e3,
               exact_fraction=exact, max_step_diff=max_diff, scale_max_ulp=ulp)


def _sm_case(torch: Any, bh: int, seq: int) -> Row:
    from plugins.softmax_quant import reference
    from plugins.softmax_quant.kernel import softmax_quantize

    gen = torch.Generator(device="cuda").manual_seed(bh + seq)
    x = (torch.randn(bh, seq, seq, device="cuda", generator=gen) * 3).half()
    scale = 1.0 / 127

    def torch_fn(x: Any) -> Any:
        p = torch.softmax(x.float(), dim=-1)
        return torch.clamp(torch.round(p / scale), -128, 127).to(torch.int8)

    compiled = torch.compile(torch_fn, dynamic=False)
    q = softmax_quantize(x, scale=scale)
    torch.cuda.synchronize()
    exact, max_diff = _compare(q.cpu().numpy(), reference.softmax_quantize(x.cpu().numpy(), scale=scale))
    xs = _copies(x, _rotation(x.numel() * x.element_size()))
    kernel_us = _graph_us(torch, [lambda x=x: softmax_quantize(x, scale=scale) for x in xs])
    eager_us = _graph_us(torch, [lambda x=x: torch_fn(x) for x in xs])
    compile_us = _graph_us(torch, [lambda x=x: compiled(x) for x in xs])
    copy_us = _graph_us(torch, [lambda x=x: torch.empty_like(x).copy_(x) for x in xs])
    nbytes = x.numel() * (2 + 1)
    return Row(op="softmax+quant", shape=f"{bh}x{seq}x{seq}", kernel_us=kernel_us, eager_us=eager_us,
               compile_us=compile_us, copy_us=copy_us, kernel_gbs=nbytes / kernel_us / 1e3,
               copy_gbs=2 * x.numel() * 2 / copy_us / 1e3, exact_fraction=exact, max_step_diff=max_diff,
               scale_max_ulp=0)


def _candidates(width: int, iters: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(ROWS, num_warps, ITERS) with 4..64 lanes per thread."""
    block = 1 << max(4, (width - 1).bit_length())
    out = []
    for rows in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4, 8):
            if 4 <= rows * block // (32 * warps) <= 64:
                out.extend((rows, warps, it) for it in iters)
    return out


def sweep(torch: Any) -> list[dict[str, Any]]:
    """Time launch candidates per shape (CUDA-graph timing); the launch_config defaults are marked."""
    from plugins.layernorm_quant import kernel as ln
    from plugins.softmax_quant import kernel as sm

    results: list[dict[str, Any]] = []
    for tokens, hidden in LN_SHAPES:
        xs = _copies(torch.randn(tokens, hidden, device="cuda").half(), _rotation(tokens * hidden * 2))
        g, b = torch.ones(hidden, device="cuda").half(), torch.zeros(hidden, device="cuda").half()
        default = ln.launch_config(hidden)[1:]
        for cand in _candidates(hidden, (1, 4)):
            us = _graph_us(torch, [lambda c=cand, x=x, g=g, b=b: ln.layernorm_quantize(
                x, g, b, epsilon=EPS, scale=0.03, tuning=c) for x in xs], replays=10)
            results.append({"op": "LN", "shape": f"{tokens}x{hidden}", "cfg": list(cand), "us": us,
                            "default": cand == default})
    for bh, seq, _ in SM_SHAPES:
        xs = _copies(torch.randn(bh, seq, seq, device="cuda").half(), _rotation(bh * seq * seq * 2))
        default2 = sm.launch_config(seq)[1:]
        for rows, warps, _ in _candidates(seq, (1,)):
            us = _graph_us(torch, [lambda c=(rows, warps), x=x: sm.softmax_quantize(
                x, scale=1 / 127, tuning=c) for x in xs], replays=10)
            results.append({"op": "SM", "shape": f"{bh}x{seq}x{seq}", "cfg": [rows, warps], "us": us,
                            "default": (rows, warps) == default2})
    return results


def format_sweep(results: list[dict[str, Any]]) -> str:
    lines = []
    for key in dict.fromkeys((r["op"], r["shape"]) for r in results):
        group = [r for r in results if (r["op"], r["shape"]) == key]
        best = min(group, key=lambda r: r["us"])
        default = next((r for r in group if r["default"]), None)
        cells = " ".join(f"{'/'.join(map(str, r['cfg']))}:{r['us']:.1f}" for r in group)
        lines.append(f"sweep {key[0]:<6} {key[1]:<12} best {'/'.join(map(str, best['cfg']))} {best['us']:.1f} us; "
                     f"default {default['us'] if default else float('nan'):.1f} us | {cells}")
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<20} {'shape':<14} {'ours us':>9} {'eager us':>9} {'compile us':>10} {'copy us':>8} "
            f"{'ours GB/s':>9} {'copy GB/s':>9} {'%copy':>6} {'vs comp':>7} {'exact':>8} {'maxd':>4} target")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.op:<20} {r.shape:<14} {r.kernel_us:9.1f} {r.eager_us:9.1f} {r.compile_us:10.1f} {r.copy_us:8.1f} "
            f"{r.kernel_gbs:9.0f} {r.copy_gbs:9.0f} {100 * r.copy_fraction:5.0f}% {r.compile_us / r.kernel_us:6.2f}x "
            f"{100 * r.exact_fraction:7.3f}% {r.max_step_diff:4d} {'yes' if r.meets_target else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"), help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="only the smallest shape of each op")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the table, time every (ROWS, num_warps) launch candidate")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench-gpu: torch is not installed; nothing measured", file=sys.stderr)
        return 5
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA GPU visible; nothing measured (run on a machine with an NVIDIA GPU)")
        return 5
    import triton

    started = time.time()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "timer": "CUDA graph of rotated-input calls, median of replays"}
    if args.sweep:
        swept = sweep(torch)
        print(format_sweep(swept), flush=True)
        args.out.write_text(json.dumps({"meta": meta, "sweep": swept}, indent=2, sort_keys=True) + "\n")
        return 0
    ln_shapes = LN_SHAPES[:1] if args.quick else LN_SHAPES
    sm_shapes = SM_SHAPES[:1] if args.quick else SM_SHAPES
    rows = [_log(_ln_case(torch, t, h, per_token=False)) for t, h in ln_shapes]
    rows += [_log(_ln_case(torch, t, h, per_token=True)) for t, h in ln_shapes]
    rows += [_log(_sm_case(torch, b, s)) for b, s, _ in sm_shapes]
    meta["seconds"] = f"{time.time() - started:.1f}"
    payload = {"meta": meta,
               "rows": [asdict(r) | {"copy_fraction": r.copy_fraction, "meets_target": r.meets_target} for r in rows]}
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(json.dumps(meta))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
