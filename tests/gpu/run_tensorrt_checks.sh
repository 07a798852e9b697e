#!/usr/bin/env bash
# Full-TensorRT checks in one command, for a machine with an NVIDIA GPU and TensorRT >= 10.9:
#
#     bash tests/gpu/run_tensorrt_checks.sh            # uses .venv/bin/python, or $PYTHON
#
# Prerequisites (checked first, with a clear message): `pip install 'build-engine[tensorrt,gpu,plugins]'`
# (tensorrt-cu12 or -cu13 >= 10.9, polygraphy >= 0.53.4, nvidia-cuda-runtime-cu12, triton). In order it runs
#   1. tests/integration/test_plugin_tensorrt.py  a softmax+quantize AOT plugin engine vs the NumPy reference
#   2. tests/gpu/test_tensorrt_paths.py           ONNX plugin graph with a dynamic sequence via --plugin-module;
#                                                 one plugin library for two builds in one process; a timing
#                                                 cache from another GPU; profiling a BF16-output engine;
#                                                 --backend auto
#   3. the TensorRT cases of tests/unit/test_backend_tensorrt.py and tests/unit/test_profile_trt.py
# and fails if any test fails or is skipped (a skip here means a prerequisite is missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"

"$PY" - <<'PYCHECK'
import sys
try:
    import tensorrt as trt
except (ImportError, OSError) as exc:
    sys.exit(f"full TensorRT does not import ({exc}); pip install 'build-engine[tensorrt,gpu,plugins]'")
major, minor = (int(p) for p in trt.__version__.split(".")[:2])
if (major, minor) < (10, 9):
    sys.exit(f"TensorRT {trt.__version__} has no AOT plugins; need >= 10.9")
from builder.profile.trt import _cuda
from plugins.aot import current_target
_cuda()
target = current_target()
print(f"TensorRT {trt.__version__}; GPU sm_{target.arch}; PTX ISA {target.ptx_isa / 10:.1f}")
PYCHECK

REPORT="$(mktemp -d)/junit.xml"
"$PY" -m pytest -p no:cacheprovider -q -rs --junitxml="$REPORT" \
    tests/integration/test_plugin_tensorrt.py \
    tests/gpu/test_tensorrt_paths.py \
    tests/unit/test_backend_tensorrt.py \
    tests/unit/test_profile_trt.py \
    -m "tensorrt"
"$PY" - "$REPORT" <<'PYCHECK'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
skipped = int(suite.get("skipped", 0))
if skipped:
    sys.exit(f"{skipped} TensorRT test(s) were skipped: a prerequisite is missing (see the skip reasons above)")
print(f"all {suite.get('tests')} TensorRT checks passed")
PYCHECK
