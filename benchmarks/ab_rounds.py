"""What the A/B tools share: variants as NAME=FLAGS, alternating round order, XLA flags
as compiler options, and per-round ratios. No JAX, no absl flags: importable anywhere.

benchmarks/flags_ab.py runs each variant in a process of its own (XLA_FLAGS);
benchmarks/options_ab.py compiles them all in one process (compiler options).
"""

from __future__ import annotations

import argparse
import re
import statistics
from typing import Any, Sequence, TypeVar

T = TypeVar("T")
DEFAULT = "default"  # options_ab.py's baseline: the step compiled with no options
_FLAG = re.compile(r"^--(xla_[A-Za-z0-9_]+)(?:=(.*))?$")


def parse_variant(text: str) -> tuple[str, str]:
  """'NAME=FLAGS' -> (NAME, FLAGS); FLAGS may be empty and may contain '='."""
  name, separator, flags = text.partition("=")
  if not separator or not name:
    raise argparse.ArgumentTypeError(f"--variant={text!r}: expected NAME=FLAGS (FLAGS may "
                                     f"be empty for the baseline).")
  return name, flags.strip()


def round_order(variants: Sequence[T], round_index: int) -> list[T]:
  """Listed order on rounds 0, 2, ...; reversed on rounds 1, 3, ..."""
  return list(variants) if round_index % 2 == 0 else list(reversed(variants))


def option_value(text: str | None) -> bool | int | float | str:
  """An XLA_FLAGS value as the type compiler options want: a bare flag or true/false is
  a bool, a number an int or float, anything else (an enum name, '') the string."""
  if text is None or text.lower() == "true":
    return True
  if text.lower() == "false":
    return False
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_options(flags_text: str) -> dict[str, Any]:
  """'--xla_a=true --xla_b=3' -> {'xla_a': True, 'xla_b': 3}; ValueError on anything
  that is not an --xla_* flag, and on a flag given twice."""
  options: dict[str, Any] = {}
  for token in flags_text.split():
    match = _FLAG.match(token)
    if not match:
      raise ValueError(f"{token!r} is not an XLA flag of the form --xla_NAME[=VALUE].")
    name, value = match.groups()
    if name in options:
      raise ValueError(f"--{name} is given twice in {flags_text!r}.")
    options[name] = option_value(value)
  return options


def option_variants(specs: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
  """(name, flags text, compiler options) for DEFAULT (no options) and each NAME=FLAGS;
  ValueError (or argparse's ArgumentTypeError for a malformed NAME=FLAGS) on a variant
  that sets nothing and on a repeated name."""
  variants = [(DEFAULT, "", {})]
  for spec in specs:
    name, text = parse_variant(spec)
    if not text:
      raise ValueError(f"--variant={spec!r} sets no option; '{DEFAULT}' is the baseline.")
    variants.append((name, text, parse_options(text)))
  names = [name for name, _, _ in variants]
  if len(set(names)) != len(names):
    raise ValueError(f"Variant names must differ (and not be '{DEFAULT}'): {names}")
  return variants


def summarize_rounds(names: Sequence[str], rounds: Sequence[dict[str, dict[str, float]]]
                     ) -> dict[str, dict[str, float]]:
  """Per variant: the median over rounds of its step and chained times, and the median,
  min and max over rounds of its ratio to the first variant's time in the same round
  (a ratio within a round cancels the load the machine had then)."""
  summary = {}
  for name in names:
    ratios = [r[name]["step_time_s"] / r[names[0]]["step_time_s"] for r in rounds]
    summary[name] = {
        "step_time_s": statistics.median(r[name]["step_time_s"] for r in rounds),
        "chained_step_time_s": statistics.median(r[name]["chained_step_time_s"]
                                                 for r in rounds),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "chained_ratio_median": statistics.median(
            r[name]["chained_step_time_s"] / r[names[0]]["chained_step_time_s"]
            for r in rounds)}
  return summary
