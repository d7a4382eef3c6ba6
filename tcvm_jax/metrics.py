"""What users see while training: clu metric writers, progress/ETA lines, interval means.

Metrics are written under `train/...` to TensorBoard (process 0 only) and as readable log
lines (every process). clu's `SummaryWriter` needs TensorFlow; on machines without it
(e.g. GPU hosts with JAX only) we fall back to log lines alone, with a warning.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

try:  # clu.metric_writers imports TensorFlow for its summary writer.
  from clu import metric_writers, periodic_actions
except ImportError as _clu_import_error:  # pragma: no cover - depends on the machine.
  metric_writers = periodic_actions = None
  _CLU_IMPORT_ERROR = _clu_import_error
else:
  _CLU_IMPORT_ERROR = None


def format_duration(seconds: float) -> str:
  """12345.6 -> '3h25m46s'; compact enough for a log line."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{seconds:02d}s"
  if minutes:
    return f"{minutes}m{seconds:02d}s"
  return f"{seconds}s"


class _LoggingOnlyWriter:
  """The subset of clu's MetricWriter we use, as log lines (used when clu is unavailable)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_writer(workdir: str | None, *, is_primary: bool):
  """TensorBoard events in `workdir` + log lines on the primary process; log lines elsewhere."""
  if metric_writers is None:
    logging.warning("clu metric writers unavailable (%s); writing log lines only.",
                    _CLU_IMPORT_ERROR)
    return _LoggingOnlyWriter()
  return metric_writers.create_default_writer(workdir, just_logging=not is_primary)


class _NoProgress:
  """Stands in for clu's ReportProgress when clu is unavailable."""

  def __call__(self, step: int) -> bool:
    del step
    return False

  @contextlib.contextmanager
  def timed(self, name: str):
    del name
    yield


def create_report_progress(num_train_steps: int, every_steps: int):
  """clu's ReportProgress: a 'N steps/s, P% (step/total), ETA: ...' line every few steps.

  Call the result after EVERY step (`report(step)`); wrap slow non-training parts in
  `report.timed('checkpoint')` so the line breaks the time down. A stand-in without clu.
  """
  if periodic_actions is None:
    return _NoProgress()
  # Its own time trigger is off: it fires with the metric lines, every `every_steps`.
  return periodic_actions.ReportProgress(num_train_steps=num_train_steps,
                                         every_steps=every_steps, every_secs=None)


class Throughput:
  """steps/s, clips/s and ETA over the interval since the last `measure` call."""

  def __init__(self, *, start_step: int, num_train_steps: int, clips_per_step: int):
    self.num_train_steps = num_train_steps
    self.clips_per_step = clips_per_step
    self._last_step = start_step
    self._last_time = time.monotonic()

  def restart(self, step: int) -> None:
    """Forgets time spent outside the loop (compilation, checkpoint waits)."""
    self._last_step = step
    self._last_time = time.monotonic()

  def measure(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    elapsed = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    remaining = self.num_train_steps - step
    eta = remaining / steps_per_sec if steps_per_sec > 0 else math.inf
    return {"steps_per_sec": steps_per_sec,
            "clips_per_sec": steps_per_sec * self.clips_per_step,
            "eta_seconds": eta}


class MeanAccumulator:
  """Host-side running means of scalar metrics over one logging interval."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._count = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    for name, value in metrics.items():
      self._sums[name] = self._sums.get(name, 0.0) + float(np.asarray(value))
    self._count += 1

  def __len__(self) -> int:
    return self._count

  def pop_means(self) -> dict[str, float]:
    means = {name: total / max(self._count, 1) for name, total in self._sums.items()}
    self._sums, self._count = {}, 0
    return means


def progress_line(step: int, num_train_steps: int, means: Mapping[str, float],
                  speed: Mapping[str, float]) -> str:
  """One readable line: step, losses, learning rate, speed and ETA."""
  return (f"step {step}/{num_train_steps} ({100.0 * step / max(num_train_steps, 1):.1f}%) | "
          f"loss {means.get('loss', math.nan):.4f} "
          f"(origin {means.get('loss_origin', math.nan):.4f}, "
          f"diff {means.get('loss_diff', math.nan):.4f}) | "
          f"lr {means.get('learning_rate', math.nan):.4g} | "
          f"{speed['steps_per_sec']:.2f} steps/s, {speed['clips_per_sec']:.1f} clips/s | "
          f"ETA {format_duration(speed['eta_seconds'])}")


def train_scalars(means: Mapping[str, float], speed: Mapping[str, float]) -> dict[str, float]:
  """Names everything `train/...` for the writers."""
  scalars = {f"train/{name}": value for name, value in means.items()}
  scalars.update({f"train/{name}": value for name, value in speed.items()
                  if math.isfinite(value)})
  return scalars
