# Sourced by scripts/gpu_session.sh, run_gpu_benchmark.sh and gpu_profile.sh on the GPU
# machine: the time-budget helpers, the install of the carried wheels (.whl/:
# ml_collections, which that machine lacks) and the compilation cache. The caller sets
# TOTAL_BUDGET_S and PYTHON first.
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*"; }
left() { echo $(( TOTAL_BUDGET_S - $(elapsed) )); }

install_carried_wheels() {
  # Once: a script called by another (gpu_session.sh -> run_gpu_benchmark.sh) inherits
  # the PYTHONPATH set here.
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) return ;; esac
  say "installing the carried wheels"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl || say "WARNING: wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
}

# Compiled XLA programs survive between scripts and calls on a warm machine (torch
# inductor keeps its own caches in /tmp).
use_compilation_cache() {
  export JAX_COMPILATION_CACHE_DIR=/tmp/jax_compilation_cache
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
}
