"""Engine-build stage: check a graph's plugin nodes against the registered plugin forms, before any parsing.

TensorRT's ONNX parser maps a node outside the standard domains to the plugin creator named by its op type,
``plugin_version`` (default "1") and ``plugin_namespace`` attributes, fills the creator's fields from
same-named attributes, and a missing attribute only logs a warning. A Quickly Deployable Plugin fixes its
input and output counts. So a node the registration cannot take fails deep inside the build, or later.
:func:`check_plugin_nodes` refuses it up front, naming the node and what it needs; :func:`required_plugins`
lists the ``(namespace, op type, version)`` creators the parser will look up, so a backend can check its
plugin registry for each before parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

from calib.errors import ConfigError, GraphError
from plugins.common import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION
from plugins.layernorm_quant.plugin import namespace_for as ln_namespace
from plugins.layernorm_quant.schema import OP_TYPE as LN_OP
from plugins.layernorm_quant.schema import LayerNormQuantizeAttrs
from plugins.softmax_quant.plugin import namespace_for as sm_namespace
from plugins.softmax_quant.schema import OP_TYPE as SM_OP
from plugins.softmax_quant.schema import SoftmaxQuantizeAttrs
from plugins.sparq_quant.schema import OP_TYPE as SPARQ_OP
from plugins.sparq_quant.schema import SparqQuantizeAttrs

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
OUR_MODULES = {LN_OP: "plugins.layernorm_quant.plugin", SM_OP: "plugins.softmax_quant.plugin",
               SPARQ_OP: "plugins.sparq_quant.plugin"}


@dataclass(frozen=True, kw_only=True)
class PluginNeed:
    """One creator the ONNX parser will look up, and the first node that needs it."""

    namespace: str
    op_type: str
    version: str
    node: str

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.op_type}"


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def _check_counts(node: onnx.NodeProto, inputs: int, outputs: int, form: str) -> None:
    got_in = len([i for i in node.input if i])
    got_out = len([o for o in node.output if o])
    if (got_in, got_out) != (inputs, outputs) or len(node.input) != got_in:
        raise GraphError(
            f"{_label(node)} has {got_in} input(s) and {got_out} output(s); its attributes select the registered "
            f"form {form!r}, which takes {inputs} input(s) and {outputs} output(s)"
        )


def _check_ours(node: onnx.NodeProto, attrs: Mapping[str, Any]) -> str:
    """Validate one of our plugin nodes; return the namespace its form is registered under."""
    aot = attrs.get("aot", 1)
    if int(aot) != 1:
        raise GraphError(
            f"{_label(node)} has aot={aot}: that asks TensorRT for a Python (JIT) implementation, which this "
            "plugin does not register; drop the attribute or set aot=1"
        )
    fields = {k: v for k, v in attrs.items() if k != "aot"}
    if node.op_type == LN_OP:
        ln = LayerNormQuantizeAttrs.from_onnx_attributes(fields)
        namespace = ln_namespace(ln)
        _check_counts(node, ln.num_inputs, ln.num_outputs, namespace)
    elif node.op_type == SPARQ_OP:  # one form: x in, INT8 codes out
        SparqQuantizeAttrs.from_onnx_attributes(fields)
        namespace = PLUGIN_NAMESPACE
        _check_counts(node, 1, 1, namespace)
    else:
        sm = SoftmaxQuantizeAttrs.from_onnx_attributes(fields)
        namespace = sm_namespace(sm)
        _check_counts(node, sm.num_inputs, 1, namespace)
    written = attrs.get("plugin_namespace")
    if written != namespace:
        raise GraphError(
            f"{_label(node)} has plugin_namespace={written!r}, but its inputs and attributes are the form "
            f"registered as {namespace!r}; re-run `build-engine quantize` to rewrite the plugin nodes"
        )
    return namespace


def check_plugin_nodes(model: onnx.ModelProto) -> tuple[PluginNeed, ...]:
    """Every creator the graph's plugin nodes need, after checking our own nodes against their forms.

    Nodes of our domain must be one of our op types with the attributes, input and output counts and
    namespace of a registered form (GraphError otherwise, exit 3). Nodes of other domains belong to the
    user's own plugins: only the lookup key is derived (namespace attribute, else the node's domain).
    """
    needs: dict[tuple[str, str, str], PluginNeed] = {}
    for node in model.graph.node:
        if node.domain in STANDARD_DOMAINS:
            continue
        attrs = _attributes(node)
        version = str(attrs.get("plugin_version", "1"))
        if node.domain == DOMAIN:
            if node.op_type not in OUR_MODULES:
                raise GraphError(f"{_label(node)}: unknown op type in domain {DOMAIN!r}; known: "
                                 f"{', '.join(OUR_MODULES)}")
            if version != PLUGIN_VERSION:
                raise GraphError(f"{_label(node)}: plugin_version {version!r}; ours is {PLUGIN_VERSION!r}")
            namespace = _check_ours(node, attrs)
        else:
            namespace = str(attrs.get("plugin_namespace", "")) or node.domain
        key = (namespace, node.op_type, version)
        needs.setdefault(key, PluginNeed(namespace=namespace, op_type=node.op_type, version=version,
                                         node=node.name or node.output[0]))
    return tuple(needs[k] for k in sorted(needs))


def check_registered(needs: tuple[PluginNeed, ...], get_creator: Any) -> None:
    """ConfigError naming each needed creator that ``get_creator(name, version, namespace)`` does not find."""
    missing = [n for n in needs if get_creator(n.op_type, n.version, n.namespace) is None]
    if not missing:
        return
    hints = sorted({f"--plugin-module {OUR_MODULES[n.op_type]}" for n in missing if n.op_type in OUR_MODULES})
    first = missing[0]
    raise ConfigError(
        f"no TensorRT plugin is registered for {len(missing)} plugin kind(s) of this graph, e.g. {first.plugin_id} "
        f"version {first.version} (node {first.node!r}); "
        + (f"register ours with {' '.join(hints)}" if hints else "load the library or module that registers it "
           "(--plugin-library / --plugin-module)")
    )
