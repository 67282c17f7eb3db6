#!/usr/bin/env bash
# The one prepared GPU run, most telling first: a short preflight; the engine on Qwen3-0.6B with
# its roofline bound and a batch-1 decode step; the Triton kernel tests (bf16 first), then the CUDA
# tests; transformers' baselines; Llama-3.1-8B; serving over HTTP; a profile of one decode step;
# the attention microbenchmark; speculative decoding on and off. Ends with one short table.
#
#   bash benchmarks/fetch_gpu_wheels.sh     # here, once: the API's and xgrammar's wheels into .whl/
#   bash benchmarks/gpu_check.sh            # there, from the repo root (carry .whl); results in ${OUT:-/tmp/gpu_check}
#   bash benchmarks/gpu_check.sh --tp 2     # on a machine with 2+ GPUs: adds the tensor-parallel tests and run
#
# Runs with the machine's own `python` (the repo on PYTHONPATH, the wheels of .whl/ if it came
# along, installed into a scratch directory; without them serving and the API tests skip). The
# whole run stays under about 8 minutes: every step has a wall-clock cap, later steps get what
# earlier ones left, and one failing step never stops the next. Each step runs in a process group
# of its own (setsid) that is killed whole when the step ends, so no server, engine process or
# worker outlives its step or holds its output. Each benchmark writes its JSON as it goes, so a
# step cut off by its cap still leaves the numbers it had.
#
# If the engine fails with its defaults (CUDA graphs, async scheduling), the same run is tried once
# with --enforce-eager --no-async-scheduling, and the later steps use whichever worked.

set -u
set +m # no job control: each step's setsid then makes the step a group of its own without forking
cd "$(dirname "$0")/.." || exit 1

TP=0
while (($#)); do
    case $1 in
    --tp)
        TP=${2:?--tp needs a GPU count}
        shift 2
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh [--tp N]" >&2
        exit 2
        ;;
    esac
done

OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

TOTAL_BUDGET_S="${GPU_CHECK_BUDGET_S:-465}" # leaves margin under 8 minutes for the summary
START_S=$SECONDS
STATUS_FILE="$OUT_DIR/steps.tsv"
: >"$STATUS_FILE"

# cap <seconds wanted> <seconds to keep for the steps after this one> -> seconds this step may run
cap() {
    local left=$((TOTAL_BUDGET_S - (SECONDS - START_S) - $2))
    ((left < $1)) && echo $((left > 15 ? left : 15)) || echo "$1"
}

# step <name> <cap seconds> <command...>: runs it in a session (process group) of its own under
# timeout, its output in $OUT_DIR/<name>.log and on stdout; then kills whatever of the group is left.
step() {
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS log="$OUT_DIR/$name.log"
    echo
    echo "=== $name (cap ${limit}s, $((SECONDS - START_S))s elapsed) ==="
    : >"$log"
    # Not a process-group leader (no job control in a script), so setsid does not fork: $! is the
    # new group's leader and its id the group's.
    setsid timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1 </dev/null &
    local group=$!
    tail -n +1 -f --pid="$group" "$log" 2>/dev/null
    wait "$group"
    local rc=$?
    kill -KILL -- "-$group" 2>/dev/null # the server, engine process, workers: gone with their step
    local took=$((SECONDS - began))
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict="cut off at cap"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed (rc $rc)"
    printf '%s\t%s\t%s\n' "$name" "$took" "$verdict" >>"$STATUS_FILE"
    echo "=== $name: $verdict in ${took}s ==="
    return "$rc"
}

skip() { # skip <name> <why>
    printf '%s\t0\tskipped: %s\n' "$1" "$2" >>"$STATUS_FILE"
    echo "=== $1: skipped ($2) ==="
}

# ---- 0. preflight (about 20 s) ----------------------------------------------------------------
echo "=== environment ==="
timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
    tee "$OUT_DIR/nvidia-smi.txt"
timeout 60 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| card", torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
      "| gpus", torch.cuda.device_count())
for name in ("transformers", "triton", "numpy", "pytest", "scipy", "fastapi", "xgrammar"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error)
EOF
git rev-parse --short HEAD 2>/dev/null | tee "$OUT_DIR/commit.txt" || echo "uncommitted" | tee "$OUT_DIR/commit.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/sluice-site
    timeout 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE" || echo "installing .whl/ failed: serving and the API tests will skip"
fi
export SLUICE_CACHE_DIR=/tmp/sluice-cache # the demo tokenizer that serving uses is built there
HAVE_PYTEST=0
"$PYTHON" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
# Collection errors in modules this machine cannot import (the API tests need fastapi) must not
# stop the others; -v: one line per test, so a run cut off at its cap still reports what ran.
PYTEST=("$PYTHON" -m pytest -v -p no:cacheprovider --continue-on-collection-errors -o addopts="")
KERNEL_TESTS=(tests/test_triton_attention.py tests/test_fused_kernels.py tests/test_fused_sampler.py
    tests/test_cuda_graphs.py tests/test_kernel_specialization.py)

# ---- 1. the engine on Qwen3-0.6B: throughput, the bound, batch-1 decode ------------------------
ENGINE_FLAGS=() # what worked, for every later engine
engine_ok() {   # the JSON holds an engine result without an error
    "$PYTHON" -c 'import json, sys; e = json.load(open(sys.argv[1]))["systems"].get("engine") or {}
sys.exit(0 if e and not e.get("error") else 1)' "$1" 2>/dev/null
}
step qwen3-0.6b "$(cap 170 340)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b --systems engine \
    --json "$OUT_DIR/qwen3-0.6b.json"
if ! engine_ok "$OUT_DIR/qwen3-0.6b.json"; then
    # Neither CUDA graphs nor async scheduling has run on a GPU before this script's first run:
    # measure once without both, so the run still yields a number and the later steps a setting.
    FALLBACK=(--enforce-eager --no-async-scheduling)
    fallback_cap=$(cap 120 240)
    ((fallback_cap < 60)) && fallback_cap=60 # a cold build, the warm-up and the run: never less
    step qwen3-0.6b-eager-sync "$fallback_cap" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b \
        --systems engine "${FALLBACK[@]}" --json "$OUT_DIR/qwen3-0.6b-eager-sync.json"
    engine_ok "$OUT_DIR/qwen3-0.6b-eager-sync.json" && ENGINE_FLAGS=("${FALLBACK[@]}")
fi
echo "engine flags for the later steps: ${ENGINE_FLAGS[*]:-(defaults)}"

# ---- 2. tensor parallelism (--tp N only) -------------------------------------------------------
if ((TP > 1)); then
    if ((HAVE_PYTEST)); then
        step tp-tests "$(cap 90 240)" "${PYTEST[@]}" tests/test_tensor_parallel.py
    else
        skip tp-tests "pytest missing"
    fi
    step "qwen3-0.6b-tp$TP" "$(cap 120 220)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b --systems engine \
        --tensor-parallel-size "$TP" "${ENGINE_FLAGS[@]}" --json "$OUT_DIR/qwen3-0.6b-tp$TP.json"
fi

# ---- 3. kernel tests, bf16 first; then the CUDA tests ------------------------------------------
if ((HAVE_PYTEST)); then
    # The fp32 configs of the prefill kernels compile for 3-28 s each: after the rest, capped apart.
    step kernel-tests "$(cap 90 300)" "${PYTEST[@]}" -m "cuda or triton" -k "not fp32" "${KERNEL_TESTS[@]}" \
        --junitxml="$OUT_DIR/kernel-tests.xml"
    step kernel-tests-fp32 "$(cap 45 270)" "${PYTEST[@]}" -m "cuda or triton" -k "fp32" "${KERNEL_TESTS[@]}" \
        --junitxml="$OUT_DIR/kernel-tests-fp32.xml"
    step cuda-tests "$(cap 90 240)" "${PYTEST[@]}" -m "cuda or triton" tests/test_cuda.py tests/test_engine_parity.py \
        tests/test_sampler.py --junitxml="$OUT_DIR/cuda-tests.xml"
    # Control tokens in messages must stay text on this machine's transformers too (issue 11).
    step control-token-tests "$(cap 45 220)" "${PYTEST[@]}" -k control_token tests
else
    skip tests "pytest missing"
fi

# ---- 4. transformers' baselines on the same model (each cut at 35 s, reported as partial) -------
step qwen3-0.6b-baselines "$(cap 100 170)" "$PYTHON" -m benchmarks.throughput --preset qwen3-0.6b \
    --systems hf-generate,hf-generate-batch --no-roofline --hf-time-limit 35 --json "$OUT_DIR/qwen3-0.6b-baselines.json"

# ---- 5. Llama-3.1-8B: the engine and its bound --------------------------------------------------
step llama-3.1-8b "$(cap 90 125)" "$PYTHON" -m benchmarks.throughput --preset llama-3.1-8b --systems engine \
    "${ENGINE_FLAGS[@]}" --json "$OUT_DIR/llama-3.1-8b.json"

# ---- 6. serving over HTTP on the Qwen3-0.6B config (dummy weights, the demo tokenizer) ----------
if "$PYTHON" -c "import fastapi, uvicorn" 2>/dev/null; then
    mkdir -p /tmp/sluice-qwen3 && cp configs/models/qwen3-0.6b.json /tmp/sluice-qwen3/config.json
    serve_config=configs/h100-qwen3-0.6b.yaml
    if ((${#ENGINE_FLAGS[@]})); then # the server has no scheduling flag: the fallback goes in its YAML
        serve_config=/tmp/sluice-qwen3/serve.yaml
        { cat configs/h100-qwen3-0.6b.yaml; printf 'enforce_eager: true\nasync_scheduling: false\n'; } >"$serve_config"
    fi
    tokenizer=$("$PYTHON" -c "from engine.models.demo_model import demo_model_path; print(demo_model_path())")
    step serving "$(cap 75 105)" "$PYTHON" -m benchmarks.serving --launch "--config $serve_config \
        --model /tmp/sluice-qwen3 --load-format dummy --tokenizer $tokenizer --log-level warning --shutdown-timeout 3" \
        --num-prompts 512 --concurrency 128 --input-len 512 --output-len 256 --warmup 8 --json "$OUT_DIR/serving.json"
else
    skip serving "fastapi/uvicorn missing (carry .whl, see fetch_gpu_wheels.sh)"
fi

# ---- 7. where a steady decode step's GPU time goes (256 sequences at 1024 tokens) ---------------
profile_flags=()
((${#ENGINE_FLAGS[@]})) && profile_flags=(--enforce-eager --sync)
# max_model_len 4096 as in step 1: the same decode graphs, so their kernels come from Triton's cache.
step profile "$(cap 60 60)" "$PYTHON" -m benchmarks.profile_step --batch 256 --context 1024 --steps 10 \
    --max-model-len 4096 "${profile_flags[@]}" --json "$OUT_DIR/profile.json"

# ---- 8. the attention kernels on their own ------------------------------------------------------
step attention-kernels "$(cap 25 40)" "$PYTHON" -m benchmarks.attention_kernels

# ---- 9. speculative decoding (issue 14), with whatever time is left -----------------------------
# Dummy weights never copy their prompt, so only the random workload: what verifying k = 3 n-gram
# proposals per row costs at batch 1 and 64 when they are seldom right, and whether every output
# stays identical (the exit status is 1 if not). Two engines, 40% of the card each.
step speculative "$(cap 40 0)" "$PYTHON" -m benchmarks.speculative --preset qwen3-0.6b --workloads random \
    --concurrency 1,64 --method ngram --num-speculative-tokens 3 "${ENGINE_FLAGS[@]}" \
    --json "$OUT_DIR/speculative.json"

# ---- summary ------------------------------------------------------------------------------------
echo
echo "=== summary ($(head -1 "$OUT_DIR/nvidia-smi.txt" 2>/dev/null), commit $(cat "$OUT_DIR/commit.txt")) ==="
for log in kernel-tests kernel-tests-fp32 cuda-tests control-token-tests tp-tests; do
    [[ -f "$OUT_DIR/$log.log" ]] || continue
    line=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$" "$OUT_DIR/$log.log" | tail -1)
    echo "$log: ${line:-no result}"
done
summaries=()
for name in qwen3-0.6b qwen3-0.6b-eager-sync "qwen3-0.6b-tp$TP" qwen3-0.6b-baselines llama-3.1-8b speculative; do
    [[ -f "$OUT_DIR/$name.json" ]] && summaries+=("$OUT_DIR/$name.json")
done
((${#summaries[@]})) && timeout 60 "$PYTHON" -m benchmarks.report "${summaries[@]}" 2>&1 | tee "$OUT_DIR/summary.md"
timeout 60 "$PYTHON" - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$OUT_DIR/summary.md"
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
echo "engine flags: ${ENGINE_FLAGS[*]:-(defaults)}; total: $((SECONDS - START_S))s; files in $OUT_DIR"
