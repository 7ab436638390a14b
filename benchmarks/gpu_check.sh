#!/usr/bin/env bash
# The generation engine's GPU checks in one run, for a machine with a CUDA device and a CUDA build of torch
# already installed (with numpy, numba, safetensors, tokenizers, tqdm, matplotlib, transformers, pytest and
# pytest-timeout). Nothing is installed or downloaded: the package runs from this checkout (PYTHONPATH=src).
#
#   1. the device and the versions in use;
#   2. the tests that run on the device where one is present (the CUDA-graph step against the op-by-op
#      forward in fp32, bf16 and int8, and the engine's tokens through it), with the generation and
#      Hugging Face interop tests beside them, under the torch and transformers installed there;
#   3. benchmarks/generate_speed.py --device cuda (extra arguments are passed on to it).
#
# Logs go to $OUT (default runs/gpu_check in the checkout). Exit status: 0 when everything passed, 1 when
# a test or the benchmark failed or the benchmark's steps fell back to op by op (the graph's capture or a
# replay raised: the engine warns and goes on), 2 when torch or transformers does not import or torch sees
# no CUDA device.
#
#     bash benchmarks/gpu_check.sh [--repeats 3]      # PYTHON=/path/to/python picks the interpreter
set -uo pipefail
python=${PYTHON:-python3}
out=${OUT:-}
[[ -n $out && $out != /* ]] && out="$PWD/$out"  # (relative to where it was called from)
[[ $python == */* && $python != /* ]] && python="$PWD/$python"
cd "$(dirname "$0")/.."
out=${out:-$PWD/runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" - <<'EOF' 2>&1 | tee "$out/device.log"
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: these checks need one")
import transformers

print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"transformers {transformers.__version__}; Python {sys.version.split()[0]}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

status=0
tests=(tests/models/test_gpt_graph.py tests/test_generation.py tests/models/test_hf.py tests/compress/test_quantize.py)
echo "== tests: ${tests[*]}"
"$python" -m pytest -o addopts= -q -rs -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/tests.log" || status=1
echo "== benchmarks/generate_speed.py --device cuda $*"
"$python" benchmarks/generate_speed.py --device cuda "$@" 2>&1 | tee "$out/generate_speed.log" || status=1
if grep -E "compiled decoding step (is unavailable|failed)" "$out/generate_speed.log"; then
    echo "== the steps above fell back to op by op: the graph rows did not measure the graph"
    status=1
fi
exit $status
