"""What the A/B tools share: variants as NAME=FLAGS, alternating round order, XLA flags
as compiler options, config overrides, and per-round ratios. No JAX, no absl flags:
importable anywhere.

benchmarks/flags_ab.py runs each variant in a process of its own (XLA_FLAGS);
benchmarks/options_ab.py compiles them all in one process (compiler options, config
overrides).
"""

from __future__ import annotations

import argparse
import re
import statistics
from typing import Any, Sequence, TypeVar

import ml_collections

T = TypeVar("T")
DEFAULT = "default"  # options_ab.py's baseline: the step compiled with no options
CONTROL = "control"  # the same, compiled again: its ratio to DEFAULT is the noise floor
_FLAG = re.compile(r"^--(xla_[A-Za-z0-9_]+)(?:=(.*))?$")
_CONFIG_FLAG = re.compile(r"^--config\.([A-Za-z0-9_.]+)=(.*)$")
_SOURCE_TABLES = re.compile(r"^FileNames\n.*?^StackFrames\n.*?\n\n", re.DOTALL | re.MULTILINE)
_STACK_FRAME = re.compile(r"\s*stack_frame_id=\d+")


def program_text(compiled) -> str:
  """A compiled program's HLO (`jax.stages.Compiled`) without its source-location tables
  (file names, lines, stack frames): two compilations of the same program from
  different call sites compare equal."""
  return _STACK_FRAME.sub("", _SOURCE_TABLES.sub("", compiled.as_text()))


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


def parse_options(flags_text: str) -> tuple[dict[str, Any], dict[str, str]]:
  """'--xla_a=true --config.model.x=2' -> ({'xla_a': True}, {'model.x': '2'}): compiler
  options (typed) and config overrides (text, typed later by the field they set).
  ValueError on any other token and on a flag or field given twice."""
  options: dict[str, Any] = {}
  overrides: dict[str, str] = {}
  for token in flags_text.split():
    xla, config = _FLAG.match(token), _CONFIG_FLAG.match(token)
    if xla:
      name, value = xla.groups()
      target, value = options, option_value(value)
    elif config:
      name, value = config.groups()
      target = overrides
    else:
      raise ValueError(f"{token!r} is neither an XLA flag (--xla_NAME[=VALUE]) nor a "
                       f"config override (--config.FIELD=VALUE).")
    if name in target:
      raise ValueError(f"{name} is given twice in {flags_text!r}.")
    target[name] = value
  return options, overrides


def _typed(kind: type, text: str, field: str) -> Any:
  if kind is bool:
    if text.lower() not in ("true", "false"):
      raise ValueError(f"--config.{field}={text!r}: expected true or false.")
    return text.lower() == "true"
  if kind in (int, float, str):
    try:
      return kind(text)
    except ValueError as e:
      raise ValueError(f"--config.{field}={text!r}: expected a value of type "
                       f"{kind.__name__}.") from e
  raise ValueError(f"--config.{field} holds a {kind.__name__}; only bool, int, float and "
                   f"str fields can be set here.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with each 'a.b.c' field set from its text, typed as the field's
  current value; ValueError for an unknown field or a value of the wrong type."""
  config = config.copy_and_resolve_references()
  for field, text in overrides.items():
    *path, leaf = field.split(".")
    parent = config
    for part in path:
      if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
        raise ValueError(f"--config.{field}: the config has no section {part!r}.")
      parent = parent[part]
    if leaf not in parent:
      raise ValueError(f"--config.{field}: the config has no field {leaf!r}.")
    parent[leaf] = _typed(type(parent[leaf]), text, field)
  return config


def option_variants(specs: Sequence[str]
                    ) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
  """(name, flags text, compiler options, config overrides) for DEFAULT (nothing set) and
  each NAME=FLAGS; ValueError (or argparse's ArgumentTypeError for a malformed
  NAME=FLAGS) on a variant that sets nothing and on a repeated name."""
  variants = [(DEFAULT, "", {}, {})]
  for spec in specs:
    name, text = parse_variant(spec)
    if not text:
      raise ValueError(f"--variant={spec!r} sets nothing; '{DEFAULT}' is the baseline.")
    variants.append((name, text, *parse_options(text)))
  names = [variant[0] for variant in variants]
  if len(set(names)) != len(names) or CONTROL in names:
    raise ValueError(f"Variant names must differ (and not be '{DEFAULT}' or '{CONTROL}'): "
                     f"{names}")
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
