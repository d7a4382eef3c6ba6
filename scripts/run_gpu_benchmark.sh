#!/usr/bin/env bash
# The GPU benchmark of issue #6 as ONE prepared command (under 5 minutes in all).
#
#   bash scripts/run_gpu_benchmark.sh            # on the GPU machine, from the repo root
#
# bf16 at the paper's shapes (32 frames of 112x112 cut into s=4 clips), per-GPU batch
# $BATCH, each phase with the PyTorch reference timed first in its own process (the same
# step: montage + augmentation + model, since 2026-11-26; also timed without the
# montage, for the earlier ratio):
#   1. R3D50: eager torch, then the JAX step      -> $OUT/r3d50_bf16.{json,log}
#   2. R3D50 under torch.compile                  -> $OUT/r3d50_bf16_torch_compile.{json,log}
#      (reuses phase 1's JAX figures, so the ratio is against the compiled reference).
#   3. R3D50 at twice the batch, JAX only         -> $OUT/r3d50_bf16_b64.{json,log}
#   4. TSM50: eager torch, then the JAX step      -> $OUT/tsm50_bf16.{json,log}
#   5. The training loop itself (python -m tcvm_jax.main, R3D50, random data, 100 steps):
#      its steps/s and clips/s lines, to compare with phase 1's bare step
#                                                 -> $OUT/loop_r3d50.log
# Phases run in order of importance; each is capped by `timeout` and by what is left of
# TOTAL_BUDGET_S, so one hang cannot eat the budget.
#
# The machine has JAX (CUDA), flax, optax, orbax and torch, but no TensorFlow,
# ml_collections or clu: ml_collections travels as a pure-Python wheel in .whl/ (made with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#  --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0`; it needs only absl-py
# and PyYAML, which are there).
#
# Knobs (environment): BATCH (default 32), STEPS (20), WARMUP (3), TOTAL_BUDGET_S (330),
# PHASE_TIMEOUT_S (170), TORCH_COMPILE (1), DOUBLE_BATCH (1; 0 skips phase 3), R3D_CONFIG
# (configs/pretrain.py), TSM_CONFIG (configs/pretrain.py:tsm50; both changeable for a dry
# run on CPU), EXTRA_FLAGS (config overrides passed to every JAX run, the loop's too;
# scripts/gpu_session.sh sets them, and XLA_FLAGS, from its A/B).
set -uo pipefail
export PYTHONUNBUFFERED=1

OUT=${OUT:-/tmp/tcvm_benchmark_out}
BATCH=${BATCH:-32}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-330}
PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-170}
TORCH_COMPILE=${TORCH_COMPILE:-1}
DOUBLE_BATCH=${DOUBLE_BATCH:-1}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
R3D_CONFIG=${R3D_CONFIG:-configs/pretrain.py}
TSM_CONFIG=${TSM_CONFIG:-configs/pretrain.py:tsm50}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"  # START, elapsed, say, left, install_carried_wheels,
                                        # use_compilation_cache
install_carried_wheels
use_compilation_cache
# JAX starts after each torch process has exited, so it may take most of the memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit \
      --format=csv
  "$PYTHON" - <<'EOF'
import platform, jax, flax, optax, ml_collections
print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "ml_collections", ml_collections.__version__)
print("devices", jax.devices())
try:
  import torch
  print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
except Exception as error:  # torch is optional
  print("torch unavailable:", error)
EOF
} 2>&1 | tee "$OUT/environment.txt"

status=0
# phase NAME MIN_SECONDS_NEEDED ARGS...: one benchmark run, capped by the time left.
phase() {
  local name=$1 needed=$2; shift 2
  local budget
  budget=$(left)
  if (( budget < needed )); then
    say "SKIP $name: ${budget}s left, it needs about ${needed}s"
    return
  fi
  (( budget > PHASE_TIMEOUT_S )) && budget=$PHASE_TIMEOUT_S
  say "=== $name (timeout ${budget}s)"
  # shellcheck disable=SC2086
  timeout -k 5 "$budget" "$PYTHON" scripts/benchmark.py --batch_size="$BATCH" \
      --dtype=bfloat16 --steps="$STEPS" --warmup="$WARMUP" "$@" $EXTRA_FLAGS \
      --json="$OUT/$name.json" 2>&1 | grep -v -E '^[IW][0-9]{4} ' | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  say "$name finished with exit code $rc"
  if [ "$rc" != 0 ]; then status=$rc; fi
}

phase r3d50_bf16 60 --config="$R3D_CONFIG" --torch_timeout_s=60

if [ "$TORCH_COMPILE" = 1 ] && [ -f "$OUT/r3d50_bf16.json" ]; then
  remaining=$(left)
  phase r3d50_bf16_torch_compile 45 --config="$R3D_CONFIG" --torch_compile \
      --notorch_eager --reuse_jax_json="$OUT/r3d50_bf16.json" \
      --torch_timeout_s=$(( remaining > 15 ? remaining - 10 : 5 ))
fi
# The same step at twice the batch, JAX only: what a larger per-GPU batch buys (B = 64
# ran 10 % more videos/s than B = 32 in the morning of 2026-11-26).
if [ "$DOUBLE_BATCH" = 1 ]; then
  phase r3d50_bf16_b64 50 --config="$R3D_CONFIG" --batch_size=$(( 2 * BATCH )) --no_torch
fi
phase tsm50_bf16 60 --config="$TSM_CONFIG" --torch_timeout_s=60
# The loop: prefetched random input, metrics read one step behind, a checkpoint at the end.
budget=$(left)
if (( budget >= 90 )); then
  say "=== loop_r3d50 (timeout 120s)"
  rm -rf /tmp/tcvm_loop_run  # a fresh run, not a resume of an earlier call's
  timeout -k 5 120 "$PYTHON" -m tcvm_jax.main --config="$R3D_CONFIG" \
      --workdir=/tmp/tcvm_loop_run --compilation_cache_dir= --config.data.name=random \
      --config.num_train_steps=100 --config.log_every_steps=25 \
      --config.checkpoint_every_steps=100000 \
      --config.model.dtype=bfloat16 --config.batch_size="$BATCH" $EXTRA_FLAGS 2>&1 \
      | grep -E "steps/s|First step|Finished|rror" | tee "$OUT/loop_r3d50.log"
  say "loop_r3d50 finished with exit code ${PIPESTATUS[0]}"
else
  say "SKIP loop_r3d50: ${budget}s left"
fi
say "done in $(elapsed)s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
