r"""A/B of XLA flag sets on the JAX pretraining step: which compiler settings help here?

  python benchmarks/flags_ab.py --variant=baseline= \
      --variant=nhwc=--xla_gpu_force_conv_nhwc=true \
      --variant=no_cuda_graphs=--xla_gpu_enable_command_buffer= \
      [--rounds=2] [--json=FILE] [--timeout_s=300] -- --config=configs/pretrain.py \
      --batch_size=32 --dtype=bfloat16 --steps=20

Each `--variant=NAME=FLAGS` is one XLA_FLAGS setting (appended to any XLA_FLAGS already
set; empty FLAGS = the baseline). Every round runs `scripts/benchmark.py` once per
variant in its own process (JAX only: --no_torch --notime_montage; arguments after `--`
go to it), in the listed order on odd rounds and reversed on even ones, so a machine
that drifts during the run favours no variant. Prints each variant's step time (median
and back to back, per round) and its ratio to the first variant; --json keeps it all.
A variant whose flags this jaxlib does not know fails alone (XLA aborts that process).
Imports neither JAX nor TensorFlow itself: runs wherever scripts/benchmark.py runs.
Processes on a shared host drift by 10-30 % from one to the next: for options XLA reads
per compilation, benchmarks/options_ab.py compares the variants in one process instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
BENCHMARK = os.path.join(REPO_ROOT, "scripts", "benchmark.py")

from benchmarks.ab_rounds import parse_variant, round_order  # pylint: disable=g-import-not-at-top


def run_variant(flags: str, benchmark_args: Sequence[str], timeout_s: int
                ) -> dict[str, Any]:
  """One scripts/benchmark.py process with `flags` added to XLA_FLAGS."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(part for part in (env.get("XLA_FLAGS", ""), flags) if part)
  with tempfile.TemporaryDirectory() as tmp:
    json_path = os.path.join(tmp, "run.json")
    command = [sys.executable, BENCHMARK, *benchmark_args, "--no_torch", "--notime_montage",
               f"--json={json_path}"]
    try:
      completed = subprocess.run(command, env=env, capture_output=True, text=True,
                                 timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout_s} s"}
    if completed.returncode != 0 or not os.path.exists(json_path):
      return {"error": f"exit {completed.returncode}: {completed.stderr.strip()[-600:]}"}
    with open(json_path) as f:
      figures = json.load(f)
  return {key: figures.get(key) for key in
          ("step_time_s", "step_time_min_s", "chained_step_time_s", "videos_per_s",
           "compile_time_s", "peak_memory_bytes", "device_kind", "final_loss")}


def summarize(variants: Sequence[tuple[str, str]], runs: dict[str, list[dict[str, Any]]]
              ) -> list[dict[str, Any]]:
  """Per variant: median over rounds of the step medians, of the chained steps, and both
  as ratios to the first variant's (< 1: faster)."""
  rows = []
  for name, flags in variants:
    good = [run for run in runs[name] if "error" not in run]
    row: dict[str, Any] = {"variant": name, "flags": flags, "rounds_ok": len(good),
                           "errors": [run["error"] for run in runs[name] if "error" in run]}
    if good:
      row["step_time_s"] = statistics.median(run["step_time_s"] for run in good)
      row["chained_step_time_s"] = statistics.median(run["chained_step_time_s"]
                                                     for run in good)
      row["step_times_by_round_s"] = [run["step_time_s"] for run in runs[name]
                                      if "error" not in run]
    rows.append(row)
  base = rows[0] if rows and "step_time_s" in rows[0] else None
  for row in rows:
    if base and "step_time_s" in row:
      row["vs_first"] = row["step_time_s"] / base["step_time_s"]
      row["chained_vs_first"] = row["chained_step_time_s"] / base["chained_step_time_s"]
  return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
  lines = [f"{'variant':<20} {'step ms':>9} {'chained ms':>10} {'vs first':>8} "
           f"{'chained vs':>10}  rounds (ms)   flags"]
  for row in rows:
    if "step_time_s" not in row:
      error = row["errors"][0][:200] if row["errors"] else "?"
      lines.append(f"{row['variant']:<20} failed: {error}")
      continue
    by_round = " ".join(f"{t * 1e3:.1f}" for t in row["step_times_by_round_s"])
    lines.append(f"{row['variant']:<20} {row['step_time_s'] * 1e3:>9.2f} "
                 f"{row['chained_step_time_s'] * 1e3:>10.2f} {row['vs_first']:>8.3f} "
                 f"{row['chained_vs_first']:>10.3f}  {by_round:<13} {row['flags']}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  benchmark_args: list[str] = []
  if "--" in argv:
    split = argv.index("--")
    argv, benchmark_args = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                      help="NAME=FLAGS, repeatable; the first is the reference.")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--timeout_s", type=int, default=600, help="per benchmark process")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  names = [name for name, _ in args.variant]
  if len(set(names)) != len(names):
    parser.error(f"variant names must differ: {names}")
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
  for round_index in range(args.rounds):
    for name, flags in round_order(args.variant, round_index):
      print(f"round {round_index + 1}/{args.rounds}: {name} (XLA_FLAGS += {flags!r})",
            flush=True)
      result = run_variant(flags, benchmark_args, args.timeout_s)
      runs[name].append(result)
      outcome = result.get("error") or f"{result['step_time_s'] * 1e3:.2f} ms"
      print(f"  {outcome}", flush=True)
  rows = summarize(args.variant, runs)
  print(format_rows(rows), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"benchmark_args": benchmark_args, "rows": rows, "runs": runs}, f, indent=1)
  return 0 if all(row.get("rounds_ok") for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
