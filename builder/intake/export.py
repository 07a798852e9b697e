"""Model intake stage: export a Hugging Face sentence encoder to ONNX with torch (imported lazily).

The graph keeps attention in eager form (QK^T MatMul, Softmax, PV MatMul visible), has dynamic batch and
sequence axes, and outputs both the last hidden state and the pooled sentence embedding
(attention-masked mean pool followed by L2 normalization, as sentence-transformers computes it).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calib.artifact_io import atomic_write_bytes
from calib.errors import BackendUnavailable, BuildError

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
EXPORT_TOLERANCE = 1e-4  # max abs difference between ONNX Runtime and PyTorch on real sentences


def _import_torch() -> Any:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(
            "exporting a model needs torch and transformers: `pip install 'build-engine[export]'`"
        ) from exc
    return torch, transformers


def _encoder_module(model_dir: Path) -> Any:
    torch, transformers = _import_torch()

    class SentenceEncoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        """Transformer body + masked mean pooling + L2 normalization."""

        def __init__(self) -> None:
            super().__init__()
            self.body = transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder().eval()


def export_sentence_encoder(model_dir: Path, out_path: Path, opset: int = 17) -> None:
    """Export the encoder in ``model_dir`` to ``out_path`` (written atomically)."""
    torch, _ = _import_torch()
    module = _encoder_module(model_dir)
    example_ids = torch.tensor([[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 102, 0, 0, 0]], dtype=torch.int64)
    example_mask = (example_ids != 0).to(torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example_ids, example_mask),
                str(tmp_path),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "last_hidden_state": {0: "batch", 1: "sequence"},
                    "sentence_embedding": {0: "batch"},
                },
                opset_version=opset,
                dynamo=False,
            )
        module.eval()  # the legacy exporter may restore train mode
        data = tmp_path.read_bytes()
    atomic_write_bytes(out_path, data)
    logger.info("exported %s (%d bytes)", out_path, len(data))


def max_abs_diff_vs_torch(model_dir: Path, onnx_path: Path, sentences: Sequence[str]) -> float:
    """Largest |ONNX Runtime - PyTorch| over both outputs for ``sentences`` (one padded batch)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    torch, _ = _import_torch()
    if not sentences:
        raise BuildError("export check needs at least one sentence")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(max_length=128)
    encodings = tokenizer.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    module = _encoder_module(model_dir)
    with torch.no_grad():
        expected = [t.numpy() for t in module(torch.from_numpy(ids), torch.from_numpy(mask))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
    return max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected, strict=True))
