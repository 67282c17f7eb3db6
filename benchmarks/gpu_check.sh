#!/usr/bin/env bash
# The one prepared GPU run: CUDA and Triton tests, then the throughput benchmarks against the
# roofline, then the attention microbenchmark, ending with one short table.
#
#   bash benchmarks/gpu_check.sh            # from the repo root; results in ${OUT:-/tmp/gpu_check}
#
# Runs with the machine's own `python` (nothing installed, the repo on PYTHONPATH). The whole run
# stays under 8 minutes: every step has a wall-clock cap, later steps get what earlier ones left,
# and one failing step never stops the next. Each benchmark writes its JSON as it goes, so a step
# cut off by its cap still leaves the numbers it had.

set -u
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

TOTAL_BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"  # leaves margin under 8 minutes for the summary
START_S=$SECONDS
STATUS_FILE="$OUT_DIR/steps.tsv"
: >"$STATUS_FILE"

# cap <seconds wanted> <seconds to keep for the steps after this one> -> seconds this step may run
cap() {
    local left=$((TOTAL_BUDGET_S - (SECONDS - START_S) - $2))
    ((left < $1)) && echo $((left > 15 ? left : 15)) || echo "$1"
}

# step <name> <cap seconds> <command...>: runs it under timeout, logs to $OUT_DIR/<name>.log
step() {
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo
    echo "=== $name (cap ${limit}s, $((SECONDS - START_S))s elapsed) ==="
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict="cut off at cap"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed (rc $rc)"
    printf '%s\t%s\t%s\n' "$name" "$took" "$verdict" >>"$STATUS_FILE"
    echo "=== $name: $verdict in ${took}s ==="
}

echo "=== environment ==="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| card", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("transformers", "triton", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error)
EOF
git rev-parse --short HEAD 2>/dev/null | tee "$OUT_DIR/commit.txt" || echo "uncommitted" | tee "$OUT_DIR/commit.txt"

# 1. CUDA and Triton tests. Collection errors in modules this machine cannot import (the API tests
# need fastapi) must not stop the GPU tests from running.
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    step tests "$(cap 100 340)" "$PYTHON" -m pytest -q -m "cuda or triton" -p no:cacheprovider \
        --continue-on-collection-errors -o addopts="" --junitxml="$OUT_DIR/tests.xml" tests
else
    printf 'tests\t0\tskipped: pytest missing\n' >>"$STATUS_FILE"
fi

# 2. Qwen3-0.6B: engine, the bound, batch-1 decode, then transformers' static generate and its
# continuous batching on the same model. Each transformers baseline gets at most 45 s; a cut-off
# run reports its rate over the part that ran (marked partial).
step qwen3-0.6b "$(cap 200 140)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b \
    --hf-time-limit 45 --json "$OUT_DIR/qwen3-0.6b.json"

# 3. Llama-3.1-8B: the engine and its bound only.
step llama-3.1-8b "$(cap 130 20)" "$PYTHON" -m benchmarks.throughput --preset llama-3.1-8b \
    --systems engine --json "$OUT_DIR/llama-3.1-8b.json"

# 4. The attention kernels on their own, if that benchmark exists yet.
if [[ -f benchmarks/attention_kernels.py ]]; then
    step attention-kernels "$(cap 45 0)" "$PYTHON" -m benchmarks.attention_kernels
else
    printf 'attention-kernels\t0\tskipped: benchmarks/attention_kernels.py not present\n' >>"$STATUS_FILE"
fi

echo
echo "=== summary ($(cat "$OUT_DIR/nvidia-smi.txt" 2>/dev/null | head -1), commit $(cat "$OUT_DIR/commit.txt")) ==="
tests_line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|passed|failed|error" "$OUT_DIR/tests.log" 2>/dev/null | tail -1)
echo "tests: ${tests_line:-no result}"
"$PYTHON" -m benchmarks.throughput --summarize "$OUT_DIR/qwen3-0.6b.json" "$OUT_DIR/llama-3.1-8b.json" \
    2>&1 | tee "$OUT_DIR/summary.md"
echo
echo "| step | seconds | result |"
echo "|---|---|---|"
while IFS=$'\t' read -r name took verdict; do
    echo "| $name | $took | $verdict |"
done <"$STATUS_FILE"
echo "total: $((SECONDS - START_S))s; files in $OUT_DIR"
