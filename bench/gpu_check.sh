#!/usr/bin/env bash
# Issue 4's GPU check: floor / sinkscope / reference-style on a random-init model of Qwen3-8B's exact shape
# (bf16), on one H100/H200-class GPU, with no network and no download, in under 8 minutes.
#
#   bench/gpu_check.sh [OUTDIR]                 # on the GPU machine; results in OUTDIR (default bench/results)
#   bench/gpu_check.sh --cpu-dry-run [OUTDIR]   # the same steps on CPU with a tiny Qwen3 and small sizes
#   bench/gpu_check.sh --scale-only [OUTDIR]    # steps 5 and 6 only (issue 10); combine with --cpu-dry-run
#
# Needs torch and transformers only; sinkscope runs from this checkout (PYTHONPATH=src), gguf is not needed.
# Steps (each with its own time limit; a failed or skipped step is noted and the others still run):
#   1. 56 prompts (the prose56 token lengths), floor / scan / decompose-output / reference-style
#   2. 512 prompts of 32 tokens, the same four variants
#   3. one 8192-token prompt: floor and scan, peak GPU memory of each in a fresh process
#   4. one 4096-token prompt: the reference-style loop (its maps alone are ~38 GB in bf16), fresh process
#   5. (issue 10) data parallel over all visible GPUs: --scan on the same prompts with 1 rank and with N ranks
#      (torchrun, NCCL, one GPU each); scaling efficiency = time at 1 GPU / (N x time at N GPUs)
#   6. (issue 10) long prompts: peak GPU memory of the plain forward and of the scan capture pass at 4k, 16k and
#      32k tokens (Qwen3-8B shape, one prompt, a fresh process each)
# Then OUTDIR/summary.md collects the figures and checks the issue's GPU targets.
set -u
cd "$(dirname "$0")/.."

MODE=gpu
SCALE_ONLY=0
OUT=""
for a in "$@"; do
  case "$a" in
    --cpu-dry-run) MODE=cpu ;;
    --scale-only) SCALE_ONLY=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) OUT="$a" ;;
  esac
done
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
START=$(date +%s)
BUDGET=${SINKSCOPE_CHECK_BUDGET:-450}   # seconds for all steps; the summary comes after

if [ "$MODE" = gpu ]; then
  MODEL=(--shape qwen3-8b --device cuda --dtype bf16)
  S56=(--prompt-lengths bench/data/prose56_lengths.json)
  S512=(--seq-len 32 --n-prompts 512)
  LONG=8192; REF_LONG=4096
  R56=5; R512=2; RLONG=3
  T1=100; T2=150; T3=110; T4=110
  MEM_SHORT=inprocess
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)
  DIST=(--shape qwen3-8b --device cuda --max-prompts 512 --dist-seq-len 32 --batch-size 64 --nproc "$NGPU"
        --warmup)
  LONGP=(--shape qwen3-8b --device cuda --lengths 4096,16384,32768)
  T5=150; T6=150
else
  MODEL=(--tiny qwen3 --device cpu --dtype fp32)
  S56=(--prompt-lengths bench/data/prose56_lengths.json --max-prompts 8)
  S512=(--seq-len 32 --n-prompts 24)
  LONG=256; REF_LONG=128
  R56=1; R512=1; RLONG=1
  T1=120; T2=120; T3=120; T4=120
  MEM_SHORT=off
  DIST=(--shape tiny-width --layers 2 --device cpu --max-prompts 16 --dist-seq-len 32 --batch-size 4 --nproc 2)
  LONGP=(--shape tiny-width --layers 2 --device cpu --lengths 256)
  T5=120; T6=120
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, transformers
print(f"[gpu_check] python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        print(f"[gpu_check] cuda:{i} {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("[gpu_check] no CUDA device")
try:
    import gguf  # noqa: F401
    print("[gpu_check] (gguf happens to be installed; nothing here imports it)")
except ImportError:
    print("[gpu_check] gguf is not installed (not needed)")
EOF

if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu_check] CUDA is not available: run with --cpu-dry-run on a machine without a GPU" | tee -a "$LOG"
  exit 2
fi

FAILED=0
budgeted() {  # budgeted NAME LIMIT_S: prints LIMIT_S capped by the time left, or notes the skip and fails
  local name="$1" limit="$2" left
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "[gpu_check] SKIPPED $name: the time budget ($BUDGET s) is spent" | tee -a "$LOG" >&2
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "$limit"
}

step() {  # step NAME LIMIT_S ARGS...
  local name="$1" limit
  limit=$(budgeted "$1" "$2") || return 0; shift 2
  echo "[gpu_check] step $name (limit ${limit}s)" | tee -a "$LOG"
  if ! timeout --kill-after=10 "$limit" "$PY" bench/bench.py "${MODEL[@]}" "$@" --label "$name" \
        --json "$OUT/$name.json" >> "$LOG" 2>&1; then
    echo "[gpu_check] step $name FAILED or timed out (see $LOG)" | tee -a "$LOG"
    FAILED=1
  fi
}

if [ "$SCALE_ONLY" = 0 ]; then
step 56-prompts "$T1" "${S56[@]}" --variants floor,scan,decompose,reference --repeats "$R56" --memory "$MEM_SHORT"
step 512x32 "$T2" "${S512[@]}" --variants floor,scan,decompose,reference --repeats "$R512" --memory "$MEM_SHORT"
step "long-$LONG" "$T3" --seq-len "$LONG" --n-prompts 1 --variants floor,scan --repeats "$RLONG" --memory subprocess
step "reference-$REF_LONG" "$T4" --seq-len "$REF_LONG" --n-prompts 1 --variants reference --repeats 1 --memory subprocess
fi

scale_step() {  # scale_step NAME LIMIT ARGS... : bench/scale_bench.py, its printout kept in OUT/scale/NAME.txt
  local name="$1" limit
  limit=$(budgeted "$1" "$2") || return 0; shift 2
  mkdir -p "$OUT/scale"          # not OUT itself: summarize.py reads every OUT/*.json as a bench.py result
  echo "[gpu_check] step $name (limit ${limit}s)" | tee -a "$LOG"
  if ! timeout --kill-after=10 "$limit" "$PY" bench/scale_bench.py "$@" --json "$OUT/scale/$name.json" \
        > "$OUT/scale/$name.txt" 2>> "$LOG"; then
    echo "[gpu_check] step $name FAILED or timed out (see $LOG)" | tee -a "$LOG"
    FAILED=1
  fi
  cat "$OUT/scale/$name.txt" | tee -a "$LOG"
}

scale_step data-parallel "$T5" dist "${DIST[@]}"
scale_step long-prompt-memory "$T6" longprompt "${LONGP[@]}"

TARGETS=""; [ "$MODE" = gpu ] && TARGETS="--gpu-targets"
"$PY" bench/summarize.py "$OUT" $TARGETS > "$OUT/summary.md"
{
  echo
  echo "mode: $MODE; total $(( $(date +%s) - START ))s; log: $LOG"
  [ "$MODE" = cpu ] && echo "(CPU dry run with a tiny Qwen3: checks the script, not the GPU figures)"
} >> "$OUT/summary.md"
if [ -d "$OUT/scale" ]; then
  {
    echo
    echo "## Scale (issue 10)"
    echo
    cat "$OUT"/scale/*.txt 2>/dev/null | sed 's/^/    /'
  } >> "$OUT/summary.md"
fi
cat "$OUT/summary.md"
exit $FAILED
