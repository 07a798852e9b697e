"""SmoothQuant migration followed by narrower codes (builder.quant.smooth: ``sparq`` and ``bits``) on the toy Llama
decoder (tests/toy_llama.py), fed token ids taken from real text (tests/unit/test_quant_smooth.py's feeds).

The lowered graph computes X / s in the folded norm (or up projection); what its Q/DQ span makes of that tensor
is compared bit for bit with the NumPy references: ``calib.sparq.sparq_int8`` on ``calib.quant.quantize``'s
codes for SPARQ (itself checked against a brute-force table in tests/unit/test_sparq_numerics.py), and an
independent clip / round-half-even / [-L, L] computation for the plain b-bit codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.report import Role
from builder.lower.checks import check_qdq_invariants
from builder.lower.sparq_ops import METADATA_KEY
from builder.pipeline import quantize
from builder.quant.registry import activation_config, activation_quantizer
from builder.quant.smooth import SmoothConfig
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from calib.errors import ConfigError
from calib.quant import quantize as int8_codes
from calib.sparq import SparqConfig, sparq_int8
from tests.unit.test_lower import run_ort
from tests.unit.test_quant_smooth import _toy

ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.GATE_PROJ, Role.UP_PROJ, Role.FC2)


def _recipe(config: SmoothConfig) -> Recipe:
    rule = Rule(select=Selector(roles=ROLES), set=Settings(precision=Precision.INT8, activation=config))
    return Recipe(name="smooth-narrow-toy", rules=(rule,))


def _spans(q: onnx.ModelProto, consumers: tuple[str, ...]) -> list[tuple[str, str, str, np.float32]]:
    """(Q input, Q output, DQ output, scale) of the Q ... DQ span feeding each consumer GEMM."""
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    spans = []
    for name in consumers:
        gemm = next(n for n in q.graph.node if n.name == name)
        dq = producer[gemm.input[0]]
        assert dq.op_type == "DequantizeLinear"
        frontier, seen = [dq.input[0]], set()
        while frontier:  # walk up the SPARQ composition (if any) to its QuantizeLinear
            node = producer[frontier.pop()]
            if node.op_type == "QuantizeLinear":
                break
            seen.add(node.name)
            frontier += [t for t in node.input if t in producer and producer[t].name not in seen]
        assert node.op_type == "QuantizeLinear"
        np.testing.assert_array_equal(inits[node.input[1]], inits[dq.input[1]])
        spans.append((node.input[0], node.output[0], dq.output[0], np.float32(inits[dq.input[1]])))
    return spans


def _lowered(config: SmoothConfig) -> tuple[Any, list[dict[str, np.ndarray]]]:
    model, report, stats, feeds = _toy("decomposed", layers=2)
    return quantize(model, report, _recipe(config), stats), feeds


@pytest.mark.parametrize("vsparq", [False, True], ids=["bsparq", "vsparq"])
def test_sparq_on_the_smoothed_codes_equals_the_numpy_reference(vsparq: bool) -> None:
    sparq = SparqConfig(window_bits=4, placements=5, vsparq=vsparq)
    result, feeds = _lowered(SmoothConfig(alpha=0.8, sparq=sparq))
    q = result.model.model
    check_qdq_invariants(q)
    edges = [e for e in result.plan.activations if e.quantizer == "smooth"]
    assert len(edges) == 6 and all(e.params.sparq == sparq for e in edges)  # q/k/v and gate/up share an input
    assert all(e.method.endswith(f"+{'v' if vsparq else 'b'}sparq4:5opt") for e in edges)
    assert sum(1 for n in q.graph.node if any(m.key == METADATA_KEY for m in n.metadata_props)) > 0
    spans = [s for e in edges for s in _spans(q, e.consumers[:1])]
    names = [t for span in spans for t in span[:3]]
    trimmed_any = False
    for feed in feeds:
        got = run_ort(q, feed, names)
        for source, codes, out, scale in spans:
            expected_codes = int8_codes(got[source], scale)
            np.testing.assert_array_equal(got[codes], expected_codes)  # QuantizeLinear itself
            trimmed = sparq_int8(expected_codes, sparq)
            np.testing.assert_array_equal(got[out], trimmed.astype(np.float32) * scale)
            trimmed_any |= bool(np.any(trimmed != expected_codes))
    assert trimmed_any, "SPARQ trimmed no code: the test would not see a missing composition"


def test_plain_low_bit_codes_of_the_smoothed_input_stay_in_range() -> None:
    result, feeds = _lowered(SmoothConfig(alpha=0.8, clip=0.5, bits=4))
    q = result.model.model
    check_qdq_invariants(q)
    edges = [e for e in result.plan.activations if e.quantizer == "smooth"]
    assert edges and all(e.method.endswith("@4b") for e in edges)
    spans = [(e, s) for e in edges for s in _spans(q, e.consumers[:1])]
    producer = {o: n for n in q.graph.node for o in n.output}
    for feed in feeds:
        names = [t for _, span in spans for t in span[:3]] + [producer[span[0]].input[0] for _, span in spans]
        got = run_ort(q, feed, names)
        for edge, (clipped, _, out, scale) in spans:
            clip = producer[clipped]
            assert clip.op_type == "Clip"
            source = got[clip.input[0]]
            assert scale == np.float32(edge.params.amax / 7)
            bound = np.float32(edge.params.amax)
            codes = np.rint(np.minimum(np.maximum(source, -bound), bound) / scale)
            assert np.abs(codes).max() <= 7 and np.abs(source).max() > bound  # clip 0.5: something clipped
            np.testing.assert_array_equal(got[out], (codes * scale).astype(np.float32))


def test_reference_of_the_registered_quantizer_matches_the_lowered_formula() -> None:
    result, _ = _lowered(SmoothConfig(alpha=0.8, sparq=SparqConfig(window_bits=3)))
    edge = next(e for e in result.plan.activations if e.quantizer == "smooth")
    s = np.asarray(edge.params.feature_scale, dtype=np.float32)
    from calib.data import lee_background_documents

    text = np.frombuffer(" ".join(lee_background_documents()[:2]).encode("utf-8")[: 4 * s.size], dtype=np.uint8)
    x = ((text.astype(np.float32) - 96.0) / 8.0).reshape(4, s.size) * s  # real bytes, spread around zero
    step = np.float32(edge.params.amax / 127)
    expected = sparq_int8(int8_codes(x / s, step), edge.params.sparq).astype(np.float32) * step * s
    np.testing.assert_array_equal(activation_quantizer("smooth").reference(x, edge.params), expected)


@pytest.mark.parametrize(("raw", "needle"), [
    ({"bits": 9}, "bits 9 is not allowed"),
    ({"bits": 1}, "bits 1 is not allowed"),
    ({"bits": 4, "sparq": {}}, "bits must stay 8"),
    ({"sparq": {"window_bits": 8}}, "window_bits 8"),
    ({"sparq": {"window_bits": 4, "placements": 4}}, "placements 4"),
])
def test_bad_narrow_options_are_config_errors(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        activation_config({"quantizer": "smooth", "alpha": 0.9, **raw}, "test")
