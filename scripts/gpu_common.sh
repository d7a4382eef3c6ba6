# Sourced by scripts/run_gpu_benchmark.sh and scripts/gpu_profile.sh on the GPU machine:
# the time-budget helpers and the install of the carried wheels (.whl/: ml_collections,
# which that machine lacks). The caller sets TOTAL_BUDGET_S and PYTHON first.
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*"; }
left() { echo $(( TOTAL_BUDGET_S - $(elapsed) )); }

install_carried_wheels() {
  say "installing the carried wheels"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl || say "WARNING: wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
}
