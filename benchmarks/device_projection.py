r"""Projects a traced pretraining step onto another device by the two devices' peaks.

  python benchmarks/device_projection.py SUMMARY.json --to=H100 \
      [--benchmark_json=BENCH.json] [--json=FILE]

SUMMARY is the summary.json that `benchmarks/profile_step.py` writes (device time per
step by phase x op category, `benchmarks/trace_summary.py`); BENCH, the same step's
`scripts/benchmark.py --json` file, gives the model FLOPs per step for the MFU.

This is an estimate, not a measurement. Each op category's measured time is scaled by
the ratio of the two devices' peak rates (`benchmarks/device_peaks.py`), for the rate
that bounds it, assuming each kernel reaches the same share of either device's peak:
  convolution     compute-bound (cuDNN ran R3D50's at 450-650 TFLOP/s on an H200):
                  the FLOP/s ratio;
  reduction, elementwise, copy/transpose, collective
                  memory-bound (BatchNorm, ReLU, residual adds, the montage's passes):
                  the bandwidth ratio;
  matmul, other   the 1x1 convs' GEMMs are memory-bound at these widths (3-4 TB/s on an
                  H200) but stages 3-4's are near compute-bound, and "other" is unnamed:
                  the low estimate scales them by the FLOP/s ratio, the high one by the
                  larger of the two ratios.
The step time is the measured chained step (the median waited step for summaries that
have none) plus the change in op time (gaps between ops are the host's and stay).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from benchmarks import device_peaks  # pylint: disable=g-import-not-at-top

COMPUTE_BOUND = ("convolution",)
MEMORY_BOUND = ("reduction", "elementwise", "copy/transpose", "collective")
EITHER = ("matmul", "other")


def time_ratios(from_kind: str, to_kind: str, dtype: str) -> dict[str, float]:
  """Time multipliers from `from_kind` to `to_kind`: {'flops': ..., 'bandwidth': ...}."""
  rates = {}
  for kind in (from_kind, to_kind):
    flops = device_peaks.peak_flops(kind, dtype)
    bandwidth = device_peaks.memory_bandwidth(kind)
    if flops is None or bandwidth is None:
      known = [entry[0] for entry in device_peaks.DEVICE_PEAKS if entry[2]]
      raise ValueError(f"No peak {dtype} FLOP/s or memory bandwidth known for {kind!r}; "
                       f"known: {known}.")
    rates[kind] = (flops, bandwidth)
  return {"flops": rates[from_kind][0] / rates[to_kind][0],
          "bandwidth": rates[from_kind][1] / rates[to_kind][1]}


def category_multipliers(category: str, ratios: dict[str, float]) -> tuple[float, float]:
  """(low, high) time multiplier for one op category."""
  if category in COMPUTE_BOUND:
    return ratios["flops"], ratios["flops"]
  if category in MEMORY_BOUND:
    return ratios["bandwidth"], ratios["bandwidth"]
  if category in EITHER:
    return ratios["flops"], max(ratios["flops"], ratios["bandwidth"])
  raise ValueError(f"Op category {category!r} has no projection rule.")


def project(summary: dict[str, Any], to_kind: str,
            model_flops_per_step: float | None = None) -> dict[str, Any]:
  """The step of `summary` (a trace summary) as `to_kind` would run it: low / high."""
  from_kind, dtype = summary["device_kind"], summary["dtype"]
  ratios = time_ratios(from_kind, to_kind, dtype)
  by_category: dict[str, dict[str, float]] = {}
  for categories in summary["by_phase_ms"].values():
    for category, ms in categories.items():
      low, high = category_multipliers(category, ratios)
      row = by_category.setdefault(category, {"measured_ms": 0.0, "low_ms": 0.0,
                                              "high_ms": 0.0})
      row["measured_ms"] += ms
      row["low_ms"] += ms * low
      row["high_ms"] += ms * high
  measured_ops = sum(row["measured_ms"] for row in by_category.values())
  # Summaries before 2026-11-26 evening have only the median of waited steps.
  chained_s = summary.get("chained_step_time_s")
  step_kind = "chained" if chained_s else "median"
  step_ms = (chained_s or summary["step_time_s"]) * 1e3
  result = {"from_device": from_kind, "to_device": to_kind, "dtype": dtype,
            "batch_size": summary.get("batch_size"), "backbone": summary.get("backbone"),
            "time_ratios": ratios, "by_category_ms": by_category, "step_kind": step_kind,
            "measured_step_ms": step_ms}
  for bound in ("low", "high"):
    ops = sum(row[f"{bound}_ms"] for row in by_category.values())
    result[f"{bound}_step_ms"] = step_ms + ops - measured_ops
  if model_flops_per_step:
    from_peak = device_peaks.peak_flops(from_kind, dtype)
    to_peak = device_peaks.peak_flops(to_kind, dtype)
    result["measured_mfu"] = model_flops_per_step / (step_ms / 1e3) / from_peak
    # The slower step (high) gives the lower MFU.
    for bound, other in (("low", "high"), ("high", "low")):
      seconds = result[f"{other}_step_ms"] / 1e3
      result[f"{bound}_mfu"] = model_flops_per_step / seconds / to_peak
  return result


def format_projection(result: dict[str, Any]) -> str:
  lines = [f"{result['backbone']}, B = {result['batch_size']}, {result['dtype']}: "
           f"{result['from_device']} (traced) -> {result['to_device']} (projected); time x "
           f"{result['time_ratios']['flops']:.3f} where compute-bound, x "
           f"{result['time_ratios']['bandwidth']:.3f} where memory-bound",
           f"  {'category':<16}{'measured ms':>12}{'low ms':>10}{'high ms':>10}"]
  for category, row in sorted(result["by_category_ms"].items(),
                              key=lambda item: -item[1]["measured_ms"]):
    lines.append(f"  {category:<16}{row['measured_ms']:12.2f}{row['low_ms']:10.2f}"
                 f"{row['high_ms']:10.2f}")
  lines.append(f"  {result['step_kind'] + ' step':<16}{result['measured_step_ms']:12.2f}"
               f"{result['low_step_ms']:10.2f}{result['high_step_ms']:10.2f}")
  if "measured_mfu" in result:
    lines.append(f"  MFU: measured {100 * result['measured_mfu']:.1f} %, projected "
                 f"{100 * result['low_mfu']:.1f}-{100 * result['high_mfu']:.1f} %")
  lines.append("  (an estimate from peak rates, not a measurement)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("summary", help="summary.json of benchmarks/profile_step.py")
  parser.add_argument("--to", required=True, help="target device kind, e.g. H100")
  parser.add_argument("--benchmark_json", help="scripts/benchmark.py --json file of the "
                      "same step (its model_flops_per_step gives the MFU)")
  parser.add_argument("--json", help="write the projection here")
  args = parser.parse_args(argv)
  with open(args.summary) as f:
    summary = json.load(f)
  model_flops = None
  if args.benchmark_json:
    with open(args.benchmark_json) as f:
      benchmark = json.load(f)
    if benchmark.get("batch_size") != summary.get("batch_size"):
      raise SystemExit(f"{args.benchmark_json} timed batch {benchmark.get('batch_size')}, "
                       f"the trace batch {summary.get('batch_size')}.")
    model_flops = benchmark["model_flops_per_step"]
  try:
    result = project(summary, args.to, model_flops)
  except ValueError as error:  # e.g. a CPU trace: no peaks to scale by
    print(f"cannot project: {error}")
    return 1
  print(format_projection(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
