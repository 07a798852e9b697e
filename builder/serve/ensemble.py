"""Serving stage: an optional text front end -- a Python-backend tokenizer model and an ensemble.

Clients send raw text (``TEXT``, TYPE_STRING) to ``<model>_text``; the ensemble runs ``<model>_tokenizer``
(the ``tokenizers`` library with the model's ``tokenizer.json``, padded to a fixed length so every request
batches with every other) and feeds its ``input_ids`` / ``attention_mask`` to the engine model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.engine.manifest import EngineManifest
from builder.serve.config import TritonOptions, engine_max_batch, triton_dtype
from calib.errors import ConfigError

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

MODEL_PY = '''"""Triton Python-backend model: raw text -> token ids for {model}, padded to MAX_LENGTH tokens."""

from pathlib import Path

import numpy as np

MAX_LENGTH = {max_length}
OUTPUTS = {outputs!r}  # output name -> numpy dtype name


def load_tokenizer(path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding or {{}}
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(pad_id=int(padding.get("pad_id", 0)), pad_token=str(padding.get("pad_token", "[PAD]")),
                             length=MAX_LENGTH)
    return tokenizer


def encode(tokenizer, texts):
    """{{output name: [len(texts), MAX_LENGTH] array}}."""
    encodings = tokenizer.encode_batch(list(texts))
    rows = {{
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }}
    return {{name: np.asarray(rows[name], dtype=dtype) for name, dtype in OUTPUTS.items()}}


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(Path(__file__).with_name("tokenizer.json"))

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text]
            arrays = encode(self.tokenizer, texts)
            tensors = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


@dataclass(frozen=True, kw_only=True)
class TextFrontEnd:
    """The tokenizer model and the ensemble, as {model name: {relative path: file content}}."""

    entries: Mapping[str, Mapping[str, bytes]]


def _token_specs(manifest: EngineManifest) -> list[tuple[str, str]]:
    names = [spec.name for spec in manifest.inputs]
    unknown = [n for n in names if n not in TOKEN_INPUTS]
    if unknown or "input_ids" not in names:
        raise ConfigError(
            f"a text front end needs an engine whose inputs are token ids ({', '.join(TOKEN_INPUTS)}); "
            f"this engine takes {', '.join(names)}"
        )
    return [(spec.name, spec.dtype) for spec in manifest.inputs]


def _io(kind: str, rows: list[tuple[str, str, str]]) -> list[str]:
    body = ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ] }}' for name, dtype, dims in rows)
    return [f"{kind} [", body, "]"]


def text_front_end(
    manifest: EngineManifest, options: TritonOptions, tokenizer_json: Path, max_length: int | None = None
) -> TextFrontEnd:
    """Files of ``<model>_tokenizer`` and ``<model>_text`` for the engine model ``options.model_name``."""
    if not tokenizer_json.is_file():
        raise ConfigError(f"tokenizer file {str(tokenizer_json)!r} does not exist")
    specs = _token_specs(manifest)
    engine_batch = engine_max_batch(manifest)
    if engine_batch is None:
        raise ConfigError("a text front end needs an engine with a dynamic batch axis")
    max_batch = engine_batch if options.max_batch is None else min(options.max_batch, engine_batch)
    profile_seq = min(int(shapes["max"][1]) for shapes in manifest.profiles[0].values())
    length = profile_seq if max_length is None else max_length
    if not 1 <= length <= profile_seq:
        raise ConfigError(f"tokenizer max length {length} must be in 1..{profile_seq} (the engine's max sequence)")
    model, tok, ens = options.model_name, f"{options.model_name}_tokenizer", f"{options.model_name}_text"
    text_in = _io("input", [("TEXT", "TYPE_STRING", "1")])
    tok_config = [f'name: "{tok}"', 'backend: "python"', f"max_batch_size: {max_batch}", *text_in,
                  *_io("output", [(s.name, triton_dtype(s), "-1") for s in manifest.inputs]),
                  "instance_group [ { kind: KIND_CPU count: 1 } ]"]
    outputs = [(s.name, triton_dtype(s), ", ".join(str(d) for d in s.shape[1:]) or "1") for s in manifest.outputs]
    token_maps = " ".join(f'output_map {{ key: "{n}" value: "{n}" }}' for n, _ in specs)
    engine_inputs = " ".join(f'input_map {{ key: "{n}" value: "{n}" }}' for n, _ in specs)
    engine_outputs = " ".join(f'output_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in outputs)
    ens_config = [f'name: "{ens}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}", *text_in,
                  *_io("output", outputs), "ensemble_scheduling {", "  step [",
                  f'    {{ model_name: "{tok}" model_version: -1 input_map {{ key: "TEXT" value: "TEXT" }} '
                  f"{token_maps} }},",
                  f'    {{ model_name: "{model}" model_version: -1 {engine_inputs} {engine_outputs} }}', "  ]", "}"]
    model_py = MODEL_PY.format(model=model, max_length=length, outputs=dict(specs))
    return TextFrontEnd(entries={
        tok: {"config.pbtxt": ("\n".join(tok_config) + "\n").encode(), "1/model.py": model_py.encode(),
              "1/tokenizer.json": tokenizer_json.read_bytes()},
        ens: {"config.pbtxt": ("\n".join(ens_config) + "\n").encode(), "1/.keep": b""},
    })
