r"""A/B of XLA compiler options and config fields on the pretraining step, every variant
in one process.

  python benchmarks/options_ab.py --config=configs/pretrain.py[:preset] \
      --variant=nhwc=--xla_gpu_force_conv_nhwc=true \
      --variant=no_command_buffer=--xla_gpu_enable_command_buffer= \
      --variant=bf16=--config.model.dtype=bfloat16 \
      [--rounds=10] [--steps_per_round=5] [--without_montage] [--nocontrol] \
      [--json=FILE] [--batch_size=32] [--dtype=bfloat16] [--config.FIELD=VALUE ...]

Compiles the step (`benchmarks.jax_step.CompiledStep`) once as configured ('default')
and once per `--variant=NAME=FLAGS`. FLAGS mixes XLA flags written as in XLA_FLAGS,
passed to `compile(compiler_options=...)` (XLA's per-compilation debug options), and
`--config.FIELD=VALUE` overrides of bool, int, float or str config fields (a code lever
behind a config switch). Then it times the variants in `--rounds` rounds, listed order on
odd rounds and reversed on even ones; in each round every variant runs
`--steps_per_round` steps waiting for each (median) and as many back to back (mean). It
prints each variant's median over rounds and the median, min and max of its per-round
ratio to 'default' (< 1: faster), and whether its compiled program differs from the
default's (identical HLO: the option changed at most code generation, or nothing). The
JSON is rewritten after every round ("rounds_done"), so a run cut short keeps what it
measured. A variant that does not compile or run is left out, named on stderr and under
"failed" in the JSON, and the exit status is 1; the others are still timed.
'control' (on unless --nocontrol) is the default compiled again: an identical program,
so its ratio shows how far two equal variants land apart here (1.005 / 1.017 over 16
rounds on the 2-core development host; 0.92 in one 5-variant run of 10 rounds).

Why in one process: on a shared host, separate processes (benchmarks/flags_ab.py) drift
by 10-30 % from one to the next; one CPU flag looked 25 % faster over three process
rounds, 1 % over four more, and 10 % slower in this script (docs/performance.md). Here
the variants share the process, its allocator and the machine's load of the moment.
Options XLA reads once per process (e.g. the number of host devices) still need
flags_ab.py. Imports neither TensorFlow nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top

# step_flags defines --config, --batch_size, --dtype and --host_memory.
from benchmarks import ab_rounds, jax_step, step_flags  # pylint: disable=g-import-not-at-top
from tcvm_jax import host_memory  # pylint: disable=g-import-not-at-top

DEFAULT = ab_rounds.DEFAULT

_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "NAME=FLAGS, repeatable: compiler options in XLA_FLAGS syntax "
    "('--xla_a=true --xla_b=3'; '--xla_x=' is an empty string) and/or config overrides "
    "('--config.model.dtype=bfloat16').")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Alternating rounds.", lower_bound=1)
_STEPS_PER_ROUND = flags.DEFINE_integer("steps_per_round", 5,
                                        "Steps per variant and round.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per variant after compiling.",
                               lower_bound=0)
_WITHOUT_MONTAGE = flags.DEFINE_bool(
    "without_montage", False, "Time the step after the montage (fed float pseudo-videos, "
    "as the PyTorch reference is) instead of the whole step.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")
_CONTROL = flags.DEFINE_bool(
    "control", True, f"Also time '{ab_rounds.CONTROL}': the default compiled a second time, "
    "an identical program whose ratio shows how far apart two equal variants land on this "
    "machine (the noise floor of the other ratios).")


def format_summary(variants: Sequence[tuple[str, str, dict[str, Any], dict[str, str]]],
                   summary: dict[str, dict[str, float]], same_hlo: dict[str, bool]) -> str:
  lines = [f"{'variant':<20} {'step ms':>8} {'chained':>8} {'ratio':>6} {'min':>6} "
           f"{'max':>6} {'chained':>7}  HLO vs default   flags"]
  for name, text, _, _ in variants:
    row = summary[name]
    hlo = "-" if name == DEFAULT else ("identical" if same_hlo[name] else "differs")
    lines.append(f"{name:<20} {row['step_time_s'] * 1e3:>8.2f} "
                 f"{row['chained_step_time_s'] * 1e3:>8.2f} {row['ratio_median']:>6.3f} "
                 f"{row['ratio_min']:>6.3f} {row['ratio_max']:>6.3f} "
                 f"{row['chained_ratio_median']:>7.3f}  {hlo:<15} {text}")
  return "\n".join(lines)


def time_round(step: jax_step.CompiledStep, steps: int) -> dict[str, float]:
  median_s, _ = jax_step.median_time(step.run_blocking, steps=steps, warmup=0)
  chained_s, _ = jax_step.chained_time(step.run, steps=steps)
  return {"step_time_s": median_s, "chained_step_time_s": chained_s}


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    variants = ab_rounds.option_variants(_VARIANTS.value)
  except (ValueError, argparse.ArgumentTypeError) as e:
    raise app.UsageError(str(e)) from e
  if len(variants) < 2:
    raise app.UsageError("Give at least one --variant=NAME=FLAGS to compare with 'default'.")
  if _CONTROL.value:
    variants.append((ab_rounds.CONTROL, "(the default, compiled again)", {}, {}))
  host_memory.configure(step_flags.HOST_MEMORY.value)  # before the first JAX computation
  config = step_flags.config_from_flags()
  steps: dict[str, jax_step.CompiledStep] = {}
  texts: dict[str, str] = {}
  failed: dict[str, str] = {}
  for name, text, options, overrides in variants:
    try:
      variant_config = ab_rounds.apply_overrides(config, overrides) if overrides else config
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    try:
      step = jax_step.CompiledStep(variant_config, without_montage=_WITHOUT_MONTAGE.value,
                                   compiler_options=options or None)
      for _ in range(_WARMUP.value):
        step.run_blocking()
    except Exception as e:  # XLA names the option it rejects (unknown name, bad value).
      # One bad variant must not cost the others (a GPU session is one short call).
      print(f"variant {name!r} ({text}) did not compile or run, left out: {e}",
            file=sys.stderr, flush=True)
      if name == DEFAULT:
        return 1
      failed[name] = str(e)[:2000]
      continue
    steps[name], texts[name] = step, ab_rounds.program_text(step.compiled)
    print(f"{name}: compiled in {step.compile_time_s:.1f} s on "
          f"{jax.devices()[0].device_kind}", flush=True)
  variants = [variant for variant in variants if variant[0] not in failed]
  names = [variant[0] for variant in variants]
  same_hlo = {name: texts[name] == texts[DEFAULT] for name in names}
  rounds: list[dict[str, dict[str, float]]] = []

  def write_json(summary):
    # After every round (with "rounds_done"): a run cut short by a time limit still
    # leaves what it measured.
    if not _JSON.value:
      return
    with open(_JSON.value + ".tmp", "w") as f:
      json.dump({"variants": [{"name": n, "flags": t, "options": o, "config_overrides": c}
                              for n, t, o, c in variants],
                 "device_kind": jax.devices()[0].device_kind,
                 "batch_size": config.batch_size, "dtype": config.model.dtype,
                 "without_montage": _WITHOUT_MONTAGE.value,
                 "compile_time_s": {n: steps[n].compile_time_s for n in names},
                 "hlo_identical_to_default": same_hlo, "summary": summary,
                 "rounds": rounds, "rounds_done": len(rounds),
                 "rounds_planned": _ROUNDS.value, "failed": failed}, f, indent=1)
    os.replace(_JSON.value + ".tmp", _JSON.value)

  start = time.perf_counter()
  for index in range(_ROUNDS.value):
    order = ab_rounds.round_order(names, index)
    rounds.append({name: time_round(steps[name], _STEPS_PER_ROUND.value) for name in order})
    print(f"round {index + 1}/{_ROUNDS.value}: " + "  ".join(
        f"{name} {rounds[-1][name]['step_time_s'] * 1e3:.1f}" for name in names) + " ms",
          flush=True)
    summary = ab_rounds.summarize_rounds(names, rounds)
    write_json(summary)
  print(format_summary(variants, summary, same_hlo), flush=True)
  print(f"{_ROUNDS.value} rounds in {time.perf_counter() - start:.0f} s", flush=True)
  if failed:
    print(f"left out (did not compile or run): {sorted(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
