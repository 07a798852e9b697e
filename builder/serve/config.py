"""Serving stage: Triton ``config.pbtxt`` text for a TensorRT engine, generated from its manifest.

The text is written by hand in a fixed layout (golden-file tested) and checked against Triton's
``ModelConfig`` protobuf when ``tritonclient`` is installed: unknown fields or enum values are rejected.

Batching: when every engine input and output has a dynamic axis 0 covered by the optimization profile,
Triton owns that axis (``max_batch_size > 0``; dims exclude it) and dynamic batching is enabled; otherwise
``max_batch_size: 0`` and the full shapes are listed. Decoder engines with a KV cache need nothing special:
their ``past_key_values.*`` inputs and ``present.*`` outputs are batch-first like every other tensor, so
they are listed as ``[kv_heads, -1, head_dim]`` with their own dtype, and the dynamic batcher only joins
requests whose cache lengths match (Triton batches equal shapes only).
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.backends.base import TensorSpec
from builder.engine.manifest import EngineManifest
from calib.errors import BackendUnavailable, ConfigError, suggest

# manifest dtype (numpy spelling) -> Triton DataType enum name
TRITON_DTYPES: dict[str, str] = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float32": "TYPE_FP32",
}


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """What the user chooses about serving (the rest comes from the manifest)."""

    model_name: str
    max_batch: int | None = None  # None: the engine profile's max batch
    instances: int = 1
    max_queue_delay_us: int = 100
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name or self.model_name.startswith("."):
            raise ConfigError(f"model name {self.model_name!r} must be non-empty, without '/' or a leading '.'")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch} must be >= 1")
        if self.instances < 1:
            raise ConfigError(f"--instances {self.instances} must be >= 1")


def triton_dtype(spec: TensorSpec) -> str:
    """Triton's TYPE_* name for a tensor; an unknown dtype is a ConfigError listing the allowed ones."""
    try:
        return TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ConfigError(
            f"tensor {spec.name!r} has dtype {spec.dtype!r}, which Triton's TensorRT backend cannot serve; "
            f"allowed: {', '.join(TRITON_DTYPES)}{suggest(spec.dtype, TRITON_DTYPES)}"
        ) from None


def engine_max_batch(manifest: EngineManifest) -> int | None:
    """The largest batch profile 0 allows, or None when the engine has no dynamic batch axis."""
    tensors = manifest.inputs + manifest.outputs
    if not manifest.profiles or not all(t.shape and t.shape[0] == -1 for t in tensors):
        return None
    return min(int(shapes["max"][0]) for shapes in manifest.profiles[0].values())


def _preferred_batches(manifest: EngineManifest, max_batch: int) -> list[int]:
    opts = {int(shapes["opt"][0]) for shapes in manifest.profiles[0].values()}
    return sorted(b for b in opts | {max_batch} if b <= max_batch)


def _tensor_block(kind: str, specs: tuple[TensorSpec, ...], batched: bool) -> list[str]:
    lines = [f"{kind} ["]
    for index, spec in enumerate(specs):
        dims = spec.shape[1:] if batched else spec.shape
        if not dims:
            dims = (1,)  # Triton needs at least one dim; a scalar per request is [1]
        comma = "," if index < len(specs) - 1 else ""
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {triton_dtype(spec)}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            f"  }}{comma}",
        ]
    lines.append("]")
    return lines


def render_config(manifest: EngineManifest, options: TritonOptions) -> str:
    """The ``config.pbtxt`` text for ``manifest`` (validated, deterministic)."""
    engine_batch = engine_max_batch(manifest)
    if engine_batch is None:
        if options.max_batch is not None and options.max_batch > 1:
            raise ConfigError(
                f"engine {manifest.name!r} has no dynamic batch axis; it cannot serve --max-batch {options.max_batch}"
            )
        max_batch = 0
    else:
        max_batch = engine_batch if options.max_batch is None else options.max_batch
        if max_batch > engine_batch:
            raise ConfigError(
                f"--max-batch {max_batch} exceeds the engine profile's max batch {engine_batch}; rebuild with "
                f"--batch 1,..,{max_batch} or lower --max-batch"
            )
    lines = [
        f'name: "{options.model_name}"',
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch}",
        *_tensor_block("input", manifest.inputs, max_batch > 0),
        *_tensor_block("output", manifest.outputs, max_batch > 0),
        "instance_group [",
        "  {",
        "    kind: KIND_GPU",
        f"    count: {options.instances}",
    ]
    if manifest.profiles:
        lines.append('    profile: [ "0" ]')
    lines += ["  }", "]"]
    if max_batch > 0:
        preferred = ", ".join(str(b) for b in _preferred_batches(manifest, max_batch))
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {preferred} ]",
            f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
            "}",
        ]
    if options.cuda_graphs:
        lines += ["optimization {", "  cuda {", "    graphs: true", "  }", "}"]
    text = "\n".join(lines) + "\n"
    return text


def validate_config(text: str) -> None:
    """Parse ``text`` with Triton's ModelConfig protobuf (text format); unknown fields raise ConfigError."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailable(
            "validating Triton configs needs tritonclient: `pip install 'build-engine[serve]'`"
        ) from exc
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"invalid Triton model config: {exc}") from exc
