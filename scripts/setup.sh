#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the agent, verifier and test
# dependencies, and the models named as arguments assembled into ~/.cache/sled/models.
# llama-cpp-python compiles from source the first time (about 9 minutes on 2 cores); pip caches
# the wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# llama.cpp compiles for the host CPU (-march=native). Its AMX kernels are left out: some virtual
# machines advertise AMX but fault on its first instruction (ldtilecfg), and a GPU verifier or a
# board never uses them. SLED_LLAMA_AMX=1 keeps them, for a CPU verifier on a Xeon that runs AMX.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "${SLED_LLAMA_AMX:-0}" != 1 ]; then
    export CFLAGS="${CFLAGS:-} $NO_AMX" CXXFLAGS="${CXXFLAGS:-} $NO_AMX"
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
python -m pip install --quiet -e ".[agent,verifier,bench,dev]"
# pip's wheel cache does not key on CFLAGS: a wheel built with AMX before this rule is rebuilt.
amx() { python -c 'import llama_cpp; print(int(b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()))'; }
if [ "${SLED_LLAMA_AMX:-0}" != 1 ] && [ "$(amx)" = 1 ]; then
    echo "setup: rebuilding llama-cpp-python without AMX" >&2
    version=$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
    python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$version"
fi
if [ "$#" -gt 0 ]; then
    sled-verifier models fetch "$@"
fi
