#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR [--dry-run]
#
# The one command a machine with an NVIDIA GPU runs first: about 10 minutes on an H100/H200 (each
# step has a time limit; their sum, 17 minutes, bounds a run that hangs), no network. It expects torch (CUDA build), triton, nvcc, CMake, ninja, pybind11, pytest, hypothesis
# and compute-sanitizer to be installed already, and fetches nothing (pip --no-build-isolation
# --no-deps). Steps, each under its own time limit, all run even when one fails:
#   env        nvidia-smi, versions
#   build      haltkit._C (HALTKIT_CUDA=ON) and haltkit._cuda_emu, then _C.probe on device 0
#   emu        the real cuda backend against its host emulation on the shared vectors: tokens,
#              state and compaction bit for bit, log-probs and values within TOL
#   gpu-tests  every test marked gpu (cuda and triton against the reference on CUDA tensors)
#   memcheck, racecheck, synccheck, initcheck
#              compute-sanitizer over a small vector set (scripts/gpu_check.py sanitize)
#   bench      bench/decode_step.py and bench/verify_step.py, GPU columns
#   e2e        haltkit.generate(compile=True) on a random Llama (CUDA graphs) against eager
#   extra      optional checks (see EXTRA CHECKS below)
# Output under OUTDIR (at most 8 files): gpu_check.log (all output), summary.json, summary.md,
# decode_step.{json,md}, verify_step.{json,md}. Exit status 0 when every step passed.
#
# GPU_CHECK_ONLY="memcheck bench" runs only the steps named (e.g. to repeat one that failed).
#
# --dry-run (CPU, run by tests/test_gpu_check.py in CI) checks this script's own logic: every
# step runs its dry form (pytest collects instead of running, the sanitizer's vector set runs on
# the emulated backend, benchmarks parse their arguments, e2e runs eagerly on the CPU), and the
# same summary files are written.
set -uo pipefail

usage() { sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=""
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUTDIR only (got $OUT and $arg)" >&2; exit 2; }; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: OUTDIR is required" >&2; usage >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
LOG="$OUT/gpu_check.log"
STEPS="$(mktemp)"
BENCH="$(mktemp -d)"
trap 'rm -rf "$STEPS" "$BENCH"' EXIT
: > "$LOG"
export GPU_CHECK_DRY_RUN=$DRY PYTHONUNBUFFERED=1
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1

# step NAME SECONDS COMMAND [DRY_COMMAND]: runs COMMAND (DRY_COMMAND under --dry-run, or records
# the step as skipped when there is none) under a time limit, appending its output to the log.
step() {
  local name=$1 limit=$2 cmd=$3 dry=${4:-} status rc start
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
  if [ "$DRY" = 1 ]; then
    cmd=$dry
    [ -n "$cmd" ] || { printf '%s\tskipped\t0\t0\t%s\n' "$name" "(no dry form)" >> "$STEPS"; return; }
  fi
  echo "=== [$name] $cmd" >> "$LOG"
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  if [ $rc = 0 ]; then status=$([ "$DRY" = 1 ] && echo dry-run || echo passed)
  elif [ $rc = 77 ]; then status=skipped
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout after ${limit}s"
  else status=failed; fi
  local ms=$((($(date +%s%N) - start) / 1000000))
  printf '%s\t%s\t%s\t%d.%03d\t%s\n' "$name" "$status" "$rc" $((ms / 1000)) $((ms % 1000)) "$cmd" >> "$STEPS"
  echo "=== [$name] $status (rc $rc)" >> "$LOG"
}

SAN="compute-sanitizer --error-exitcode 1 --print-limit 20"
PYTEST="$PY -m pytest -q -p no:cacheprovider"

step env 30 \
  "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -2" \
  "$PY -c 'import torch; print(torch.__version__)'; cmake --version | head -1; command -v nvcc compute-sanitizer || true"
step build 240 \
  "HALTKIT_CUDA=ON $PY -m pip install -e . --no-build-isolation --no-deps -q && $PY -c 'import haltkit._C as c, haltkit._cuda_emu; why = c.probe(0); print(\"probe:\", why or \"ok\"); raise SystemExit(1 if why else 0)'" \
  "$PY -c 'import haltkit._cpu, haltkit._cuda_emu; print(\"modules importable\")'"
step emu 120 \
  "$PYTEST -m gpu tests/test_cuda_emu.py -k real_cuda_matches_the_emulated" \
  "$PYTEST -m gpu --collect-only tests/test_cuda_emu.py -k real_cuda_matches_the_emulated"
step gpu-tests 180 \
  "$PYTEST -m gpu -k 'not real_cuda_matches_the_emulated' tests" \
  "$PYTEST -m gpu --collect-only tests"
for tool in memcheck racecheck synccheck initcheck; do
  step "$tool" $([ $tool = racecheck ] && echo 90 || echo 60) "$SAN --tool $tool $PY scripts/gpu_check.py sanitize" \
    "$([ $tool = memcheck ] && echo "$PY scripts/gpu_check.py sanitize --dry-run")"
done
step bench 120 \
  "$PY bench/decode_step.py --device cuda --budget 1 --reps 20 --out '$BENCH' && $PY bench/verify_step.py --device cuda --out '$BENCH'" \
  "$PY bench/decode_step.py --help > /dev/null && $PY bench/verify_step.py --help > /dev/null && echo 'bench arguments parse'"
step e2e 120 "$PY scripts/gpu_check.py e2e" "$PY scripts/gpu_check.py e2e --dry-run"

# ---- EXTRA CHECKS -----------------------------------------------------------------------------
# Optional checks other parts of haltkit add here, one `step` line each (NAME, seconds, GPU
# command, dry-run command), e.g. the vLLM V1/V2 engine-level check. Keep the total near 10 min
# and the files under OUTDIR at most 8 (the log holds each step's output).
# vLLM inside a real engine (Model Runner V2, n-gram drafts): exit status 77 when this machine has
# no CUDA build of vLLM, recorded as skipped.
step vllm 300 "$PY scripts/gpu_check_vllm.py" "$PY -m py_compile scripts/gpu_check_vllm.py"
# ---- end of EXTRA CHECKS ----------------------------------------------------------------------

for f in decode_step.json decode_step.md verify_step.json verify_step.md; do
  [ -f "$BENCH/$f" ] && cp "$BENCH/$f" "$OUT/$f"
done
$PY scripts/gpu_check.py summary "$STEPS" "$OUT" >> "$LOG" 2>&1
rc=$?
cat "$OUT/summary.md" 2>/dev/null
exit $rc
