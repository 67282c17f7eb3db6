#!/usr/bin/env bash
# Downloads the wheels that the GPU machine lacks into .whl/ (ignored by git): the API's web stack
# (fastapi, starlette, uvicorn, pydantic, and what they need beyond the machine's own packages) and
# xgrammar, for its Python 3.12 on x86-64 Linux, in the versions this checkout's .venv runs. The
# machine already has torch, transformers, triton, httpx, anyio, h11, click, annotated-doc and
# prometheus-client. benchmarks/gpu_check.sh installs whatever .whl/ holds; the device tool must
# carry it: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]). About 8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
for name in fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    opentelemetry-api xgrammar apache-tvm-ffi; do
    version=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls -l .whl
