#!/usr/bin/env bash
# Issue #6 on a GPU in ONE device call (under 10 minutes): what the rare GPU session runs.
#
#   bash scripts/gpu_session.sh          # on the GPU machine, from the repo root
#
#   1. levers   A/B of the R3D50 step in one process (benchmarks/options_ab.py, $ROUNDS
#               alternating rounds): the defaults against each of LEVERS below, if any.
#               Now model.bn_fold: BatchNorm folded into the 1x1 convs that widen >= 4x
#               (conv_c, stage 1's shortcut) or >= 2x (every shortcut too), and the
#               first with the block-end ReLU's gradient from its output
#               (tcvm_jax/folded_batch_norm.py; not yet run on a GPU); and BatchNorm's
#               gradient in closed form on top of one_reduction statistics. The ones
#               before were decided on an H200 on 2026-11-27
#               (benchmarks/results/2026-11-27_h200_c/): the tree state 2.2 % and the
#               block stem's pool gradient by selects 0.1 % against the defaults, the
#               blocks' 1x1 convs as Pallas kernels ('pallas' 1.9 %, 'pallas_all' 3.8 %
#               slower). All variants compile before the first round (the default in
#               40-46 s on an H200, the others in ~15-25 s), so the phase must fit them
#               all. If XLA aborts the process while compiling one, the A/B runs again
#               without it                         -> $OUT/options_ab.{json,log}
#   2. winners  benchmarks/ab_winners.py: the variants that beat the default by >= 2 %
#               (chained steps), as XLA flags and config overrides, and the augment
#               phase's winner                     -> $OUT/winners.txt
#   3. the benchmark (scripts/run_gpu_benchmark.sh) with the winners applied, in the time
#      left but $PROFILE_S: R3D50 against eager PyTorch, against torch.compile (~85 s to
#      compile), R3D50 at twice the batch (JAX only; with DOUBLE_BATCH=1), TSM50, the
#      training loop                               -> $OUT/*.json, *.log
#      and, in TSM_TRITON_S, TSM50 with XLA's Triton GEMM fusions on against the defaults
#      (off for TSM, tcvm_jax/xla_options.py), alone and with model.tsm_shift=barrier
#                                                  -> $OUT/tsm_triton*.{log,json}
#   4. a device trace of 3 R3D50 steps with the winners (benchmarks/profile_step.py), for
#      reading offline with benchmarks/trace_summary.py (time, GB/s, TFLOP/s per op)
#                                                  -> $OUT/profile/
#      and that trace projected onto the other Hopper part by the two parts' peak FLOP/s
#      and bandwidth (benchmarks/device_projection.py; an estimate, ~1 s): an H200's
#      trace onto the H100 the targets name, an H100's onto the H200
#                                                  -> $OUT/projection.{log,json}
# First, only with AUGMENT_S > 0: the augmentation alone (benchmarks/augment_variants.py:
# the CUDA defaults less one choice each: float32 planes, the blur along H as taps, the
# colour jitter as XLA passes; if the Pallas kernel takes the process down, the benchmark
# runs with the XLA jitter); its fastest variant, if >= 5 % faster than the default, goes
# to the benchmark                       -> $OUT/augment.{log,json}, $OUT/augment_winner.txt
# Off by default since 2026-11-28: two H200 sessions (2026-11-27) found no winner, and the
# A/B needs its time (up to 120 s) for its third and fourth variants.
# (The stem phase, benchmarks/stem_variants.py, decided model.stem_layout on 2026-11-27;
# the 1x1 conv phase, benchmarks/conv1x1_variants.py, timed the Pallas kernels per shape
# on 2026-11-27 evening. Neither runs here now.)
# Last, if >= 12 s are left: the host's time for one jitted call on the train state, as
# nnx.States and as the plain dicts the step keeps (benchmarks/state_dispatch.py, ~10 s)
#                                                  -> $OUT/dispatch.log
# More than 8 files come back from $OUT only inside an archive: call it as
#   O=$OUT; rm -rf /tmp/s; OUT=/tmp/s bash scripts/gpu_session.sh; tar czf $O/all.tgz -C /tmp/s .
# (a machine may keep /tmp from an earlier session: a stale stem.log came back once).
# The winners are not made defaults here: that is a code change for the session that
# reads the results (layers.BatchNorm's 'auto', backbones.CUDA_AUTO_BN_FOLD for a fold, a
# CUDA flag in the step's compile options).
#
# Knobs (environment): OUT (/tmp/tcvm_gpu_session), TOTAL_BUDGET_S (560), AUGMENT_S (0:
# no augment phase), ROUNDS (6), PROFILE_S (60), BENCHMARK_S (200, kept for the
# benchmark), BATCH (32), DOUBLE_BATCH (0), TSM_TRITON_S (110), R3D_CONFIG
# (configs/pretrain.py; run_gpu_benchmark.sh's too), TSM_CONFIG (configs/pretrain.py:tsm50).
# A dry run on CPU (every phase, ~5 minutes): PYTHON=venv/bin/python
# R3D_CONFIG=configs/pretrain.py:demo TSM_CONFIG=configs/pretrain.py:demo BATCH=4 ROUNDS=2.
# Needs .whl/ (see run_gpu_benchmark.sh); imports no TensorFlow.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tcvm_gpu_session}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-560}
AUGMENT_S=${AUGMENT_S:-0}
ROUNDS=${ROUNDS:-6}
PROFILE_S=${PROFILE_S:-60}
BENCHMARK_S=${BENCHMARK_S:-200}
BATCH=${BATCH:-32}
# B = 64 was measured twice (MFU 23.4-23.7 %); its phase (~90 s) gives way to the TSM ones.
DOUBLE_BATCH=${DOUBLE_BATCH:-0}
TSM_TRITON_S=${TSM_TRITON_S:-110}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"  # START, elapsed, say, left, install_carried_wheels,
                                        # use_compilation_cache
install_carried_wheels
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
use_compilation_cache
quiet() { grep --line-buffered -v -E '^[IW][0-9]{4} |^WARNING: All log|oneDNN'; }
# run_logged SECONDS LOG COMMAND...: COMMAND under a timeout, its output (less XLA's log
# lines) shown and appended to LOG; returns COMMAND's exit code, not tee's.
run_logged() {
  timeout -k 5 "$1" "${@:3}" 2>&1 | quiet | tee -a "$2"
  return "${PIPESTATUS[0]}"
}

rm -f "$OUT/augment_winner.txt" "$OUT/augment.json"
# augment SECONDS [ARGS...]: the augment phase; its exit code.
augment() {
  run_logged "$1" "$OUT/augment.log" "$PYTHON" benchmarks/augment_variants.py \
      --json="$OUT/augment.json" --winner_flags="$OUT/augment_winner.txt" "${@:2}"
}
if (( AUGMENT_S > 0 )); then
  say "=== augment"
  : > "$OUT/augment.log"
  augment "$AUGMENT_S"
  rc=$?
  # Variants that fail to compile are reported and skipped, but an XLA CHECK failure takes
  # the whole process down. The Pallas kernel is the one part new to XLA here, and on CUDA
  # it is in the default: the benchmark then runs with the XLA jitter.
  if [ ! -f "$OUT/augment.json" ] && (( rc == 134 || rc == 139 )); then
    say "augment: the process died (exit code $rc); the benchmark takes the XLA jitter" \
        | tee -a "$OUT/augment.log"
    echo "--config.augment.jitter_kernel=xla" > "$OUT/augment_winner.txt"
  fi
fi

# NAME=--flag ... (the variants to A/B against the defaults, see above; a variant of
# several flags is one quoted word). Each compiles before the first round (on an H200 the
# default ~40 s, each other ~16 s; 2026-11-27: three variants and 6 rounds in ~105 s, so
# four ~125 s), and the phase gets ~190 s with the augment phase off.
# The third: with conv_c's output no longer read in the backward pass, the block-end
# ReLU's mask is the one wide tensor kept only for that pass; the block's output, kept
# anyway, can replace it (from_output alone did not win on 2026-11-27: 0.998 / 1.000,
# when y was read in the backward pass anyway).
# The fourth: BatchNorm's gradient in closed form, timed once on 2026-11-26 at 0.984
# chained / 0.976 waited, short of the 2 % margin, against the defaults of then, and
# never on top of bn_statistics=one_reduction, which won that A/B (0.976 / 0.979) and
# became CUDA's default. If it and a fold both win, the benchmark runs with both
# (ab_winners.py keeps winners that set different fields; folded BatchNorms keep their
# own gradient).
LEVERS=(
  bn_fold_4x=--config.model.bn_fold=widening_4x
  bn_fold_2x=--config.model.bn_fold=widening_2x
  "bn_fold_4x_relu_out=--config.model.bn_fold=widening_4x --config.model.block_relu_gradient=from_output"
  bn_closed_form=--config.model.bn_gradient=closed_form
)
# levers VARIANT...: the A/B; the benchmark after it keeps BENCHMARK_S (~150 s for its
# first two phases, R3D50 against eager torch and torch.compile, ~85 s to compile: the
# headline ratio, in one call), PROFILE_S and TSM_TRITON_S.
levers() {
  local variants=() variant
  for variant in "$@"; do variants+=(--variant="$variant"); done
  run_logged $(( $(left) - BENCHMARK_S - PROFILE_S - TSM_TRITON_S )) "$OUT/options_ab.log" \
      "$PYTHON" benchmarks/options_ab.py --config="${R3D_CONFIG:-configs/pretrain.py}" \
      --batch_size="$BATCH" --dtype=bfloat16 "${variants[@]}" --rounds="$ROUNDS" \
      --nocontrol --json="$OUT/options_ab.json"
}

rm -f "$OUT/options_ab.json"
rc=0
if (( ${#LEVERS[@]} > 0 )); then
  say "=== levers (A/B, $ROUNDS rounds)"
  : > "$OUT/options_ab.log"
  levers "${LEVERS[@]}"
  rc=$?
  say "levers finished with exit code $rc"
fi
# An XLA CHECK failure aborts the whole process (as compiling TSM50 did on 2026-11-26),
# before any round is written. Leave out the variant it was compiling (the first one
# not reported compiled) and run the others once more; their programs now come from the
# compilation cache.
if [ ! -f "$OUT/options_ab.json" ] && (( rc == 134 || rc == 139 )); then
  kept=()
  culprit=""
  for variant in "${LEVERS[@]}"; do
    name=${variant%%=*}
    if [ -z "$culprit" ] && ! grep -q "^$name: compiled" "$OUT/options_ab.log"; then
      culprit=$name
    else
      kept+=("$variant")
    fi
  done
  if [ -n "$culprit" ] && grep -q "^default: compiled" "$OUT/options_ab.log" \
      && (( ${#kept[@]} > 0 )); then
    say "levers: the process died compiling '$culprit'; again without it" \
        | tee -a "$OUT/options_ab.log"
    levers "${kept[@]}"
    say "levers (second try) finished with exit code $?"
  fi
fi

WINNING_XLA_FLAGS="" WINNING_CONFIG_FLAGS=""
if [ -f "$OUT/options_ab.json" ]; then
  eval "$("$PYTHON" benchmarks/ab_winners.py "$OUT/options_ab.json" 2>"$OUT/winners.txt")"
  cat "$OUT/winners.txt"
fi
if [ -s "$OUT/augment_winner.txt" ]; then
  augment_flags=$(cat "$OUT/augment_winner.txt")
  WINNING_CONFIG_FLAGS="${WINNING_CONFIG_FLAGS:+$WINNING_CONFIG_FLAGS }$augment_flags"
fi
say "winners: XLA_FLAGS+='$WINNING_XLA_FLAGS' config: '$WINNING_CONFIG_FLAGS'" \
    | tee -a "$OUT/winners.txt"
# XLA reads an XLA_FLAGS that does not start with '--' (even " ") as a file name: add the
# winners only when there are some.
if [ -n "$WINNING_XLA_FLAGS" ]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$WINNING_XLA_FLAGS"
fi

say "=== benchmark with the winners ($(left)s left)"
EXTRA_FLAGS="$WINNING_CONFIG_FLAGS" OUT="$OUT" BATCH="$BATCH" DOUBLE_BATCH="$DOUBLE_BATCH" \
    TOTAL_BUDGET_S=$(( $(left) - PROFILE_S - TSM_TRITON_S )) bash scripts/run_gpu_benchmark.sh

# TSM50 with XLA's Triton GEMM fusions on, which tcvm_jax/xla_options.py turns off for
# TSM programs (XLA aborted compiling TSM50 with them on 2026-11-26): an A/B against the
# defaults, the fusions on alone and with model.tsm_shift=barrier (the shifted input
# materialised behind an optimization barrier, so no GEMM fusion takes in the temporal
# shift's concatenation: the suspected trigger gone, the 1x1 convs still XLA's; until
# 2026-11-28 the second variant was conv1x1_kernel=pallas_all, slower on R3D50). One
# process each, so an abort in one leaves the other; their defaults come from the
# compilation cache (the benchmark's TSM50 phase compiled the same program).
TSM_TRITON_VARIANTS=(
  "triton_gemm=--xla_gpu_enable_triton_gemm=true"
  "triton_gemm_shift_barrier=--xla_gpu_enable_triton_gemm=true --config.model.tsm_shift=barrier"
)
say "=== tsm_triton ($(left)s left)"
: > "$OUT/tsm_triton.log"
for variant in "${TSM_TRITON_VARIANTS[@]}"; do
  name=${variant%%=*}
  budget=$(( $(left) - PROFILE_S ))
  (( budget > 75 )) && budget=75
  if (( budget < 40 )); then
    say "SKIP tsm_triton $name: ${budget}s left" | tee -a "$OUT/tsm_triton.log"
    continue
  fi
  run_logged "$budget" "$OUT/tsm_triton.log" "$PYTHON" benchmarks/options_ab.py \
      --config="${TSM_CONFIG:-configs/pretrain.py:tsm50}" --batch_size="$BATCH" \
      --dtype=bfloat16 --variant="$variant" --rounds=4 --nocontrol \
      --json="$OUT/tsm_triton_$name.json"
  say "tsm_triton $name finished with exit code $?" | tee -a "$OUT/tsm_triton.log"
done

say "=== profile with the winners ($(left)s left)"
# shellcheck disable=SC2086
timeout -k 5 $(( $(left) - 3 )) "$PYTHON" benchmarks/profile_step.py \
    --config="${R3D_CONFIG:-configs/pretrain.py}" --batch_size="$BATCH" --dtype=bfloat16 \
    --time_steps=5 --out="$OUT/profile" $WINNING_CONFIG_FLAGS 2>&1 | quiet | tail -45 \
    | tee "$OUT/profile.log"

if [ -s "$OUT/profile/summary.json" ]; then
  other_part=H100
  grep -q '"device_kind": "[^"]*H100' "$OUT/profile/summary.json" && other_part=H200
  bench_json=()
  [ -s "$OUT/r3d50_bf16.json" ] && bench_json=(--benchmark_json="$OUT/r3d50_bf16.json")
  "$PYTHON" benchmarks/device_projection.py "$OUT/profile/summary.json" --to="$other_part" \
      ${bench_json[@]+"${bench_json[@]}"} --json="$OUT/projection.json" 2>&1 \
      | tee "$OUT/projection.log"
fi

# Last, in what the profile left (it rarely needs all of its slot): nice to have.
if (( $(left) >= 12 )); then
  say "=== dispatch ($(left)s left)"
  : > "$OUT/dispatch.log"
  run_logged "$(left)" "$OUT/dispatch.log" "$PYTHON" benchmarks/state_dispatch.py \
      --rounds=2 --calls=100
fi
say "done in $(elapsed)s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
