#!/usr/bin/env bash
# Profiles the pretraining step on the GPU machine (issue #6) in ONE command:
#
#   PHASES="r3d50 stem torch_eager r3d50_b64 tsm50" bash scripts/gpu_profile.sh
#
#   r3d50          JAX R3D50, B=32, bf16: timing + a 3-step device trace -> $OUT/r3d50/
#   stem           the stem conv three ways (benchmarks/stem_variants.py)
#   torch_eager    PyTorch eager reference: kernel time by category (benchmarks/torch_profile.py)
#   r3d50_b64      JAX R3D50 at B=64 (does the step scale with the batch?)
#   tsm50          JAX TSM50, B=32
# (The A/B of the step's levers is scripts/gpu_session.sh's.)
# Only r3d50 keeps its trace and HLO; the others keep summary.json. Everything printed
# goes to $OUT/log.txt too. Summaries: python benchmarks/trace_summary.py TRACE HLO.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tcvm_profile_out}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-300}
PHASES=${PHASES:-r3d50 stem torch_eager r3d50_b64 tsm50}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"  # START, elapsed, say, left, install_carried_wheels
install_carried_wheels
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
run() {  # run NAME MIN_SECONDS COMMAND...
  local name=$1 needed=$2; shift 2
  local budget; budget=$(left)
  if (( budget < needed )); then echo "SKIP $name (${budget}s left)"; return; fi
  echo "=== $name (+$(elapsed)s, timeout ${budget}s)"
  timeout -k 5 "$budget" "$@" 2>&1 | grep -v -E '^[IW][0-9]{4} |^WARNING: All log|oneDNN'
  echo "=== $name exit ${PIPESTATUS[0]}"
}
profile() {  # profile NAME MIN_SECONDS KEEP_TRACE ARGS...
  local name=$1 needed=$2 keep=$3; shift 3
  run "$name" "$needed" "$PYTHON" benchmarks/profile_step.py --dtype=bfloat16 \
      --out="$OUT/$name" "$@"
  if [ "$keep" != 1 ]; then rm -f "$OUT/$name/trace.json.gz" "$OUT/$name/hlo.txt.gz"; fi
}
for phase in $PHASES; do
  case $phase in
    r3d50) profile r3d50 90 1 --config=configs/pretrain.py --batch_size=32 ;;
    stem) run stem 30 "$PYTHON" benchmarks/stem_variants.py ;;
    torch_eager) run torch_eager 40 "$PYTHON" benchmarks/torch_profile.py \
        --config=configs/pretrain.py --batch_size=32 --dtype=bfloat16 ;;
    r3d50_b64) profile r3d50_b64 80 0 --config=configs/pretrain.py --batch_size=64 \
        --steps=2 --time_steps=10 ;;
    tsm50) profile tsm50 80 0 --config=configs/pretrain.py:tsm50 --batch_size=32 \
        --steps=2 --time_steps=10 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo "done in $(elapsed)s"
