#!/usr/bin/env bash
# On a GPU machine without flwr/opacus or a package index: install the wheels of .whl/
# (built by bench/gpu/wheelhouse.sh) beside the preinstalled PyTorch, then run the GPU tests
# and the GPU benchmarks, writing everything to $OUT (default ./gpu-results):
#   env.txt    the GPU, driver and package versions
#   tests.txt  pytest of tests/test_gpu.py and the CUDA tests of tests/test_privacy.py
#   bench.txt  python -m bench --device cuda (overhead and DP-SGD ratios on the GPU)
#   bench-dp.txt  python -m bench.dp --device cuda (every model and Opacus engine)
# Each step is time-bounded so that the whole kit ends in about eight minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedml-site .whl/*.whl || { echo "installing .whl failed" | tee "$out/env.txt"; exit 1; }
export PYTHONPATH=/tmp/fedml-site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, flwr, opacus; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'flwr', flwr.__version__, 'opacus', opacus.__version__, 'gpus', torch.cuda.device_count())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py \
    tests/test_privacy.py -k "cuda or gpu" > "$out/tests.txt" 2>&1
echo "tests: exit $?" | tee -a "$out/tests.txt"
timeout 150 python3 -m bench --device cuda > "$out/bench.txt" 2>&1
echo "bench: exit $?" | tee -a "$out/bench.txt"
timeout 120 python3 -m bench.dp --device cuda --repeats 3 --rounds 2 > "$out/bench-dp.txt" 2>&1
echo "bench.dp: exit $?" | tee -a "$out/bench-dp.txt"
tail -n 5 "$out/tests.txt" "$out/bench.txt"
