#!/usr/bin/env bash
# The one prepared GPU run: CUDA and Triton tests, the throughput benchmarks against the roofline,
# serving over HTTP, a profile of one decode step, the attention microbenchmark; ends with one
# short table.
#
#   bash benchmarks/fetch_gpu_wheels.sh     # here, once: the API's and xgrammar's wheels into .whl/
#   bash benchmarks/gpu_check.sh            # there, from the repo root (carry .whl); results in ${OUT:-/tmp/gpu_check}
#
# Runs with the machine's own `python` (the repo on PYTHONPATH, the wheels of .whl/ if it came
# along, installed into a scratch directory; without them serving and the xgrammar test skip). The whole run
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

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/sluice-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$SITE" || echo "installing .whl/ failed: serving and xgrammar will skip"
fi
export SLUICE_CACHE_DIR=/tmp/sluice-cache  # the demo tokenizer that serving uses is built there

# 1. CUDA and Triton tests. Collection errors in modules this machine cannot import (the API tests
# need fastapi) must not stop the GPU tests from running.
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    # Most telling first (a cut-off run still reports them), one line per test.
    step tests "$(cap 100 360)" "$PYTHON" -m pytest -v -m "cuda or triton" -p no:cacheprovider \
        --continue-on-collection-errors -o addopts="" --junitxml="$OUT_DIR/tests.xml" \
        tests/test_cuda.py tests/test_fused_kernels.py tests/test_fused_sampler.py tests/test_engine_parity.py \
        tests/test_triton_attention.py tests
else
    printf 'tests\t0\tskipped: pytest missing\n' >>"$STATUS_FILE"
fi

# 2. Qwen3-0.6B: engine, the bound, batch-1 decode, then transformers' static generate and its
# continuous batching on the same model. Each transformers baseline gets at most 35 s; a cut-off
# run reports its rate over the part that ran (marked partial).
step qwen3-0.6b "$(cap 160 210)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b \
    --hf-time-limit 35 --json "$OUT_DIR/qwen3-0.6b.json"
engine_ok() {  # the JSON holds an engine result without an error
    "$PYTHON" -c 'import json, sys; e = json.load(open(sys.argv[1]))["systems"].get("engine") or {}
sys.exit(0 if e and not e.get("error") else 1)' "$1" 2>/dev/null
}
if ! engine_ok "$OUT_DIR/qwen3-0.6b.json"; then
    # Async scheduling has not run on a GPU before this script's first run: if the engine failed,
    # measure it once with synchronous scheduling so the run still yields a number.
    step qwen3-0.6b-sync "$(cap 60 210)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b \
        --systems engine --no-async-scheduling --no-roofline --json "$OUT_DIR/qwen3-0.6b-sync.json"
fi

# 3. Llama-3.1-8B: the engine and its bound only.
step llama-3.1-8b "$(cap 90 120)" "$PYTHON" -m benchmarks.throughput --preset llama-3.1-8b \
    --systems engine --json "$OUT_DIR/llama-3.1-8b.json"

# 4. Serving over HTTP: the server on the Qwen3-0.6B config (dummy weights, the demo tokenizer so
# text is detokenized as in production), streaming clients at a fixed concurrency.
if "$PYTHON" -c "import fastapi, uvicorn" 2>/dev/null; then
    mkdir -p /tmp/sluice-qwen3 && cp configs/models/qwen3-0.6b.json /tmp/sluice-qwen3/config.json
    tokenizer=$("$PYTHON" -c "from engine.demo_model import demo_model_path; print(demo_model_path())")
    step serving "$(cap 70 50)" "$PYTHON" -m benchmarks.serving --launch "--config configs/h100-qwen3-0.6b.yaml \
        --model /tmp/sluice-qwen3 --load-format dummy --tokenizer $tokenizer --log-level warning" \
        --num-prompts 512 --concurrency 128 --input-len 512 --output-len 256 --warmup 8 --json "$OUT_DIR/serving.json"
else
    printf 'serving\t0\tskipped: fastapi/uvicorn missing (carry .whl, see fetch_gpu_wheels.sh)\n' >>"$STATUS_FILE"
fi

# 5. Where a steady decode step's GPU time goes (256 sequences at 1024 tokens), against its bound.
step profile "$(cap 35 15)" "$PYTHON" -m benchmarks.profile_step --batch 256 --context 1024 --steps 10 \
    --json "$OUT_DIR/profile.json"

# 6. The attention kernels on their own, with whatever time is left.
step attention-kernels "$(cap 25 0)" "$PYTHON" -m benchmarks.attention_kernels

echo
echo "=== summary ($(cat "$OUT_DIR/nvidia-smi.txt" 2>/dev/null | head -1), commit $(cat "$OUT_DIR/commit.txt")) ==="
tests_line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|passed|failed|error" "$OUT_DIR/tests.log" 2>/dev/null | tail -1)
echo "tests: ${tests_line:-no result}"
summaries=("$OUT_DIR/qwen3-0.6b.json" "$OUT_DIR/llama-3.1-8b.json")
[[ -f "$OUT_DIR/qwen3-0.6b-sync.json" ]] && summaries+=("$OUT_DIR/qwen3-0.6b-sync.json")
"$PYTHON" -m benchmarks.report "${summaries[@]}" 2>&1 | tee "$OUT_DIR/summary.md"
"$PYTHON" - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$OUT_DIR/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "serving.json").exists():
    s = json.loads((out / "serving.json").read_text())
    t, p = s["ttft_ms"], s["tpot_ms"]
    print(f"serving: {s['completed']} ok / {s['failed']} failed, {s['output_throughput_tok_s']:.0f} output tok/s, "
          f"TTFT p50 {t['p50']:.0f} p99 {t['p99']:.0f} ms, TPOT p50 {p['p50']:.1f} p99 {p['p99']:.1f} ms")
if (out / "profile.json").exists():
    r = json.loads((out / "profile.json").read_text())
    print(f"decode step ({r['running']} seqs): wall {r['wall_ms_per_step']:.2f} ms, GPU kernels "
          f"{r['gpu_ms_per_step']:.2f} ms ({r['kernels_per_step']:.0f} kernels), bound {r['bound_ms_per_step']:.2f} ms")
    for name, calls, micros in r["top_kernels"][:6]:
        print(f"  {micros:7.0f} us x{calls:.0f}  {name[:80]}")
EOF
echo
echo "| step | seconds | result |"
echo "|---|---|---|"
while IFS=$'\t' read -r name took verdict; do
    echo "| $name | $took | $verdict |"
done <"$STATUS_FILE"
echo "total: $((SECONDS - START_S))s; files in $OUT_DIR"
