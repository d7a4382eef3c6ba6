r"""The variants an options_ab.py run shows to be faster, as flags for the next run.

  eval "$(python benchmarks/ab_winners.py OPTIONS_AB.json [--min_gain=0.02])"

sets WINNING_XLA_FLAGS (XLA_FLAGS syntax) and WINNING_CONFIG_FLAGS ('--config.F=V ...',
what scripts/benchmark.py takes) for `scripts/gpu_session.sh`, which measures the step
with the winners after the A/B in one device call. The reasons go to stderr.

A variant wins when the median over rounds of its chained-step ratio to 'default' (the
training loop runs steps back to back) is at most 1 - margin and its waited-step ratio
is below 1; margin = max(--min_gain, how far 'control', the default compiled twice,
landed from 1). A variant of config fields only whose compiled program is the
default's (`hlo_identical_to_default`: e.g. a CUDA-only switch timed on a CPU) changed
nothing and cannot win; one with XLA flags may (they can act after the HLO). Winners
that set the same flag or field differently: the faster one.
Pure Python (no JAX): runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from benchmarks import ab_rounds  # pylint: disable=g-import-not-at-top


def pick_winners(result: dict[str, Any], min_gain: float = 0.02
                 ) -> tuple[list[str], list[str], list[str]]:
  """(winning variant names, fastest first; their XLA flags; their config flags)."""
  summary = result["summary"]
  margin = min_gain
  if ab_rounds.CONTROL in summary:
    margin = max(margin, abs(1.0 - summary[ab_rounds.CONTROL]["chained_ratio_median"]),
                 abs(1.0 - summary[ab_rounds.CONTROL]["ratio_median"]))
  same_program = result.get("hlo_identical_to_default", {})
  candidates = sorted(
      (summary[v["name"]]["chained_ratio_median"], v["name"], v["flags"])
      for v in result["variants"]
      if v["name"] not in (ab_rounds.DEFAULT, ab_rounds.CONTROL)
      and not (same_program.get(v["name"]) and not ab_rounds.parse_options(v["flags"])[0])
      and summary[v["name"]]["chained_ratio_median"] <= 1.0 - margin
      and summary[v["name"]]["ratio_median"] < 1.0)
  names, xla_flags, config_flags, taken = [], [], [], set()
  for _, name, flags_text in candidates:
    options, overrides = ab_rounds.parse_options(flags_text)
    keys = {("xla", option) for option in options} | {("config", f) for f in overrides}
    if keys & taken:  # a faster winner already set one of these
      continue
    taken |= keys
    names.append(name)
    for token in flags_text.split():  # parse_options accepted each as one or the other
      (config_flags if token.startswith("--config.") else xla_flags).append(token)
  return names, xla_flags, config_flags


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("result", help="The --json file of benchmarks/options_ab.py.")
  parser.add_argument("--min_gain", type=float, default=0.02,
                      help="Smallest chained-step gain that counts (0.02: 2 %%).")
  args = parser.parse_args(argv)
  with open(args.result) as f:
    result = json.load(f)
  names, xla_flags, config_flags = pick_winners(result, args.min_gain)
  for variant in result["variants"]:
    row = result["summary"][variant["name"]]
    verdict = "WINS" if variant["name"] in names else "-"
    print(f"{variant['name']:<20} chained ratio {row['chained_ratio_median']:.3f}, waited "
          f"{row['ratio_median']:.3f}  {verdict}", file=sys.stderr)
  print(f"WINNING_XLA_FLAGS={shlex.quote(' '.join(xla_flags))}")
  print(f"WINNING_CONFIG_FLAGS={shlex.quote(' '.join(config_flags))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
