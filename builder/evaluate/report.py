"""Evaluation stage: the AccuracyReport artifact (version 2; a strict msgspec Schema).

One report describes one evaluated model against its FP32 reference on the same held-out data:

* ``outputs``: every compared float output (cosine per vector, relative and max-abs error; for logits the
  top-1 agreement and the mean KL divergence KL(FP32 || model));
* ``sentence``: sentence-encoder figures (cosine of pooled embeddings, the VADER logistic-regression probe,
  Spearman on the Lee rated pairs) when an embedding can be formed;
* ``language``: language-model figures (perplexity over fixed windows, next-token agreement and KL, greedy
  generation through the KV cache and the cached-vs-full-sequence check) for causal ``logits`` outputs;
* ``computed`` / ``skipped``: which figures were computed, and why each other one was not;
* the INT8 GEMM share, the per-layer residual-stream error and warnings.
"""

from __future__ import annotations

import math
from typing import Any

from calib.errors import ConfigError
from calib.schema import Schema, convert, decode_json, to_builtins, to_json

ACCURACY_REPORT_VERSION = 2

# sub-block points of a transformer layer whose output error is reported
LAYER_POINTS = ("attn", "block")
OUTPUT_KINDS = ("logits", "embedding", "hidden", "tensor")


def _finite(owner: str, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{owner}.{name}={value!r} is not a finite number")


class LayerError(Schema, frozen=True):
    """Error of one residual-stream tensor against the same tensor in FP32 (over non-padding tokens).

    ``relative_error`` is ``||y - y_fp32||_F / ||y_fp32||_F``; ``None`` when the evaluated model no longer
    has a tensor of that name.
    """

    layer: int
    point: str  # "attn": after the attention sub-block; "block": after the whole block (FFN included)
    tensor: str
    relative_error: float | None
    max_abs_error: float | None

    def __post_init__(self) -> None:
        if self.point not in LAYER_POINTS:
            raise ConfigError(f"layer point {self.point!r} unknown; expected one of {LAYER_POINTS}")


class OutputFidelity(Schema, frozen=True):
    """One float output against FP32: per-vector cosine (vectors along the last axis), errors, logits figures."""

    name: str
    kind: str  # logits, embedding, hidden or tensor
    vectors: int  # compared vectors (non-padding positions x leading axes)
    cosine_mean: float
    cosine_min: float
    relative_error: float
    max_abs_error: float
    top1_agreement: float | None = None  # logits: argmax equal to FP32's
    kl_mean: float | None = None  # logits: mean KL(FP32 || model) per position, in nats

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ConfigError(f"output kind {self.kind!r} unknown; expected one of {OUTPUT_KINDS}")
        _finite("OutputFidelity", cosine_mean=self.cosine_mean, cosine_min=self.cosine_min,
                relative_error=self.relative_error, max_abs_error=self.max_abs_error,
                top1_agreement=self.top1_agreement, kl_mean=self.kl_mean)


class SentenceFigures(Schema, frozen=True):
    """Sentence-encoder figures (fractions in [0, 1])."""

    embedding: str  # where the embedding came from (a pooled output, or the masked mean of a hidden state)
    num_train: int  # probe training sentences
    num_test: int  # probe test sentences (cosine is measured on these too)
    num_pairs: int  # rated Lee document pairs
    probe_accuracy: float  # FP32-fitted probe scored on this model's test embeddings
    probe_accuracy_refit: float | None  # probe refitted on this model's own train embeddings (None: skipped)
    reference_probe_accuracy: float  # FP32 probe on FP32 test embeddings
    cosine_mean: float
    cosine_min: float
    spearman: float | None  # None: undefined (constant similarities)
    reference_spearman: float | None

    def __post_init__(self) -> None:
        _finite("SentenceFigures", probe_accuracy=self.probe_accuracy, refit=self.probe_accuracy_refit,
                reference_probe_accuracy=self.reference_probe_accuracy, cosine_mean=self.cosine_mean,
                cosine_min=self.cosine_min, spearman=self.spearman, reference_spearman=self.reference_spearman)


class Generation(Schema, frozen=True):
    """Greedy continuation of one prompt through the KV-cache graph, beside FP32's."""

    prompt: str
    text: str
    reference_text: str
    tokens: tuple[int, ...]
    reference_tokens: tuple[int, ...]
    agreement: int  # leading generated tokens equal to FP32's


class CacheCheck(Schema, frozen=True):
    """Logits of the cached path (prefill, then one token at a time) against one full-sequence run."""

    positions: int  # compared positions over all prompts
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float  # allowed max_abs_diff: relative tolerance x max(1, max_abs_logit)
    within: bool
    argmax_equal: bool


class LanguageFigures(Schema, frozen=True):
    """Language-model figures on held-out text (non-overlapping windows, no special tokens added)."""

    corpus: str  # the text source and its split rule
    window: int  # tokens per window; each window predicts window - 1 tokens
    windows: int
    tokens: int  # predicted tokens over all windows
    perplexity: float
    reference_perplexity: float
    top1_agreement: float  # next-token argmax equal to FP32's
    kl_mean: float  # mean KL(FP32 || model) per predicted position, nats
    generation: tuple[Generation, ...] = ()
    cache_check: CacheCheck | None = None
    reference_cache_check: CacheCheck | None = None

    def __post_init__(self) -> None:
        _finite("LanguageFigures", perplexity=self.perplexity, reference_perplexity=self.reference_perplexity,
                top1_agreement=self.top1_agreement, kl_mean=self.kl_mean)

    @property
    def perplexity_ratio(self) -> float:
        """Perplexity over FP32's (1.03: 3% worse)."""
        return self.perplexity / self.reference_perplexity


class Skipped(Schema, frozen=True):
    """A figure that was not computed, and why."""

    figure: str
    reason: str


class AccuracyReport(Schema, frozen=True):
    """Accuracy of one model against its FP32 reference (see the module docstring)."""

    model_name: str
    computed: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()
    outputs: tuple[OutputFidelity, ...] = ()
    sentence: SentenceFigures | None = None
    language: LanguageFigures | None = None
    int8_gemm_share: float | None = None  # share of MatMul/Gemm MACs with both inputs dequantized from INT8
    layer_errors: tuple[LayerError, ...] = ()
    peak_rss_mib: float | None = None  # peak resident memory of the evaluating process
    warnings: tuple[str, ...] = ()
    version: int = ACCURACY_REPORT_VERSION

    # read-only views kept for callers of version 1 (sentence encoders); None where not computed
    @property
    def probe_accuracy(self) -> float | None:
        return None if self.sentence is None else self.sentence.probe_accuracy

    @property
    def reference_probe_accuracy(self) -> float | None:
        return None if self.sentence is None else self.sentence.reference_probe_accuracy

    @property
    def cosine_mean(self) -> float | None:
        return None if self.sentence is None else self.sentence.cosine_mean

    @property
    def probe_delta(self) -> float | None:
        """Probe accuracy minus the FP32 reference's (negative: the model lost accuracy)."""
        s = self.sentence
        return None if s is None else s.probe_accuracy - s.reference_probe_accuracy

    def headline(self) -> str:
        """One line with the main figures (for step summaries)."""
        if self.language is not None:
            lm = self.language
            return (f"perplexity {lm.perplexity:.3f} (FP32 {lm.reference_perplexity:.3f}), next-token top-1 "
                    f"{100 * lm.top1_agreement:.2f}%, KL {lm.kl_mean:.4f}")
        if self.sentence is not None:
            s = self.sentence
            return (f"probe {100 * s.probe_accuracy:.2f}% (FP32 {100 * s.reference_probe_accuracy:.2f}%), "
                    f"cosine mean {s.cosine_mean:.4f}")
        if self.outputs:
            worst = min(self.outputs, key=lambda o: o.cosine_mean)
            return f"output {worst.name!r} cosine mean {worst.cosine_mean:.4f}, rel err {worst.relative_error:.4f}"
        return "no figures"

    def worst_layers(self, count: int = 3, point: str = "block") -> tuple[LayerError, ...]:
        """The ``count`` layers with the largest relative error at ``point``."""
        rows = [e for e in self.layer_errors if e.point == point and e.relative_error is not None]
        rows.sort(key=lambda e: (-(e.relative_error or 0.0), e.layer))
        return tuple(rows[:count])

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_builtins(self)
        return data

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyReport:
        if not isinstance(data, dict) or data.get("version") != ACCURACY_REPORT_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"AccuracyReport version {found!r} not supported; expected {ACCURACY_REPORT_VERSION}")
        return convert(data, cls, "AccuracyReport")

    @classmethod
    def from_json(cls, text: str) -> AccuracyReport:
        return decode_json(text, cls, "AccuracyReport", version=ACCURACY_REPORT_VERSION)
