"""Test support: a tiny random Llama decoder exported in the KV-cache form, with a real BPE tokenizer beside it.

The tokenizer is a byte-level BPE (512 ids) trained with the ``tokenizers`` library on the calibration slice of
gensim's Lee background corpus (deterministic). The model is ``transformers.LlamaForCausalLM`` from a tiny
``LlamaConfig`` (RMSNorm, rotary positions, grouped-query attention with 4 query and 2 KV heads, gated MLP,
tied LM head) with seeded random weights, exported by ``torch.onnx`` (TorchScript exporter) as one graph that
serves prefill and decode:

    inputs   input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
             past_key_values.{i}.key / .value [batch, 2, past, 16]
    outputs  logits [batch, seq, 512], present.{i}.key / .value [batch, 2, past + seq, 16]

Both files are cached under ``~/.cache/build-engine/test-decoders/<key>/`` (key: library versions and the
config), so torch is imported only on the first run.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from builder.intake.minilm import cache_root
from calib.artifact_io import atomic_write_bytes, sha256_text

VOCAB = 512
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
}
SEED = 0
SCHEMA = 1  # bump when the export changes


def _key() -> str:
    versions = [importlib.metadata.version(p) for p in ("torch", "transformers", "tokenizers")]
    return sha256_text(json.dumps([versions, CONFIG, SEED, SCHEMA], sort_keys=True))[:12]


def train_tokenizer(path: Path) -> None:
    """A byte-level BPE of ``VOCAB`` ids trained on the Lee calibration slice, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calib.data import corpus_split

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_split("lee").calibration, trainer=trainer)
    atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))


def llama_module() -> Any:
    """The seeded random ``LlamaForCausalLM`` (eager attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()


def _export(model: Any, path: Path) -> None:
    import tempfile

    import torch
    from transformers import DynamicCache

    layers, kv, head = CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], 16

    class KVCacheGraph(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(config=model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    ids = torch.randint(0, VOCAB, (2, 5))
    example = (ids, torch.ones(2, 8, dtype=torch.int64), torch.arange(3, 8).expand(2, 5),
               *[torch.randn(2, kv, 3, head) for _ in past_names])
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dynamic.update({n: {0: "batch", 2: "past"} for n in past_names})
    dynamic.update({n: {0: "batch", 2: "total"} for n in present_names})
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(KVCacheGraph().eval(), example, str(out), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=dynamic)
        atomic_write_bytes(path, out.read_bytes())


def tiny_llama(folder: Path | None = None) -> Path:
    """Path of the cached ``model.onnx`` (``tokenizer.json`` beside it), exporting both on the first call."""
    root = (cache_root() / "test-decoders" / _key()) if folder is None else folder
    model_path = root / "model.onnx"
    if not (root / "tokenizer.json").is_file():
        train_tokenizer(root / "tokenizer.json")
    if not model_path.is_file():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
            _export(llama_module(), model_path)
    return model_path
