"""Timing helpers for the jitted JAX pretraining step (issue #6).

Everything here runs on device-resident synthetic uint8 videos and never imports
TensorFlow or clu (the GPU machine has neither).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tcvm_jax import flat_state
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import montage as montage_lib
from tcvm_jax import optim
from tcvm_jax import train_step as train_step_lib
from tcvm_jax import xla_options
from tcvm_jax.flops import count_macs  # re-exported: the benchmark counts model FLOPs with it

from benchmarks.device_peaks import peak_flops  # re-exported: MFU's denominator

COLLECTIVE_OPS = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter",
                  "collective-permute")
_HLO_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def median_time(fn: Callable[[], Any], *, steps: int, warmup: int) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def chained_time(fn: Callable[[], Any], *, steps: int) -> tuple[float, Any]:
  """Mean wall time of `steps` calls of `fn` dispatched back to back with one wait at the
  end, as the training loop runs steps (hides per-step dispatch gaps); and the last
  result."""
  start = time.perf_counter()
  for _ in range(steps):
    result = fn()
  jax.block_until_ready(result)
  return (time.perf_counter() - start) / steps, result


def flops_from_cost_analysis(cost: Any) -> float | None:
  """'flops' out of `compiled.cost_analysis()` (a dict, or a list of dicts in older jax)."""
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    values = [flops_from_cost_analysis(c) for c in cost]
    values = [v for v in values if v is not None]
    return sum(values) if values else None
  flops = cost.get("flops") if hasattr(cost, "get") else None
  return float(flops) if flops is not None and flops >= 0 else None


def collective_bytes(hlo_text: str | None) -> dict[str, dict[str, int]]:
  """Count and result bytes of each collective in compiled (per-device) HLO text.

  Async pairs are counted once, at their `-done` (whose result is the output buffer).
  """
  summary = {op: {"count": 0, "bytes": 0} for op in COLLECTIVE_OPS}
  if not hlo_text:
    return summary
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVE_OPS) + r")(-done)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match or f"{match.group(2)}-start(" in line:
      continue
    num_bytes = 0
    for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      num_bytes += size * _HLO_DTYPE_BYTES.get(dtype, 4)
    summary[match.group(2)]["count"] += 1
    summary[match.group(2)]["bytes"] += num_bytes
  return summary


def forward_macs_per_video(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward MACs per pseudo-video of the backbone and of the whole model (+ TC, OFC heads),
  counted from their jaxprs (nothing is compiled or allocated).

  The model's arithmetic, whatever layout computes it: counted with the stem in the pixel
  layout. The block layout (`model.stem_layout='blocks'`, and 'auto' on CUDA, which
  `count_macs` resolves to its cheapest form) multiplies by zero taps too (2.9x the stem
  conv's MACs, +4 % on R3D50): work it does, not the model's, so MFU must not count it
  (the H200 figures of 2026-11-27's first run, with 'blocks' set, did: see
  docs/performance.md)."""
  config = config.copy_and_resolve_references()
  config.model.stem_layout = "pixels"
  graphdef, params, batch_stats = train_step_lib.abstract_model(config)
  size = config.montage.output_size
  frames, clips = config.data.num_frames, config.montage.num_clips
  videos = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)

  def backbone(params, batch_stats, videos):
    return nnx.merge(graphdef, params, batch_stats).backbone(videos)

  backbone_jaxpr = jax.make_jaxpr(backbone)(params, batch_stats, videos)
  features = backbone_jaxpr.out_avals[0]  # (1, T, h, w, C)
  segments = jax.ShapeDtypeStruct((clips, frames // clips, *features.shape[2:]),
                                  features.dtype)

  def heads(params, batch_stats, segments):
    model = nnx.merge(graphdef, params, batch_stats)
    return model.tc_head(segments), model.ofc_head(segments)

  backbone_macs = count_macs(backbone_jaxpr.jaxpr)
  head_macs = count_macs(jax.make_jaxpr(heads)(params, batch_stats, segments).jaxpr)
  return {"backbone": backbone_macs, "model": backbone_macs + head_macs}


def parameter_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Trainable parameters of the JAX model: total and backbone only (no allocation)."""
  _, params, _ = train_step_lib.abstract_model(config)
  total = backbone = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = math.prod(leaf.shape)
    total += size
    first = path[0]
    if getattr(first, "key", getattr(first, "name", None)) == "backbone":
      backbone += size
  return {"total_params": total, "backbone_params": backbone}


def synthetic_videos(config: ml_collections.ConfigDict, mesh, batch_size: int,
                     seed: int = 0) -> jax.Array:
  """Random uint8 videos (B, T, input_size, input_size, 3), generated sharded on device."""
  size = config.data.input_size
  shape = (batch_size, config.data.num_frames, size, size, 3)

  def generate(key):
    return jax.random.randint(key, shape, 0, 256, dtype=jnp.int32).astype(jnp.uint8)

  return jax.jit(generate, out_shardings=mesh_lib.batch_sharding(mesh))(jax.random.key(seed))


def _memory_analysis(compiled) -> dict[str, int | None]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    analysis = None
  names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
           "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {name: (int(getattr(analysis, name)) if hasattr(analysis, name) else None)
          for name in names}


def utilisation(model_flops_per_step: float, xla_flops_per_step: float | None,
                step_time_s: float, chained_step_time_s: float, peak: float | None,
                num_devices: int) -> dict[str, float | None]:
  """The step's FLOP/s and MFU figures (None where the peak or XLA's count is unknown).

  `mfu` (and `chained_mfu`, steps dispatched back to back as the training loop runs them)
  counts the model's FLOPs (6 x its forward MACs per pseudo-video: the issue's MFU).
  `xla_mfu` counts what XLA's cost analysis reports for the compiled program, which leaves
  out library calls: on a GPU the cuDNN convolutions and cuBLAS matmuls, most of the
  work (2.7 % against 21.8 % on the H200, 2026-11-27). Result files before 2026-11-28
  named the model's figure `model_mfu` and XLA's `mfu`.
  """
  capacity = peak * num_devices if peak else None
  xla_flops_per_s = xla_flops_per_step / step_time_s if xla_flops_per_step else None
  return {
      "flops_per_step": xla_flops_per_step,
      "flops_per_s": xla_flops_per_s,
      "peak_flops_per_device": peak,
      "model_flops_per_step": model_flops_per_step,
      "mfu": model_flops_per_step / step_time_s / capacity if capacity else None,
      "chained_mfu": model_flops_per_step / chained_step_time_s / capacity if capacity else None,
      "xla_mfu": xla_flops_per_s / capacity if (capacity and xla_flops_per_s) else None,
  }


def peak_memory_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class CompiledStep:
  """The jitted pretraining step, compiled for device-resident synthetic videos.

  `run()` applies one step (asynchronously) and returns its metrics; the state it
  carries is donated and replaced each time. `without_montage=True` compiles the step
  after the montage instead (`train_step.make_update_step`), fed the same float
  pseudo-videos every time, made once by the montage: what the PyTorch reference times.
  `compiler_options` go to XLA's compile (its debug options, as named in XLA_FLAGS).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, without_montage: bool = False,
               compiler_options: dict[str, Any] | None = None):
    self.mesh = mesh_lib.create_mesh()
    mesh_lib.check_batch_divisible(config.batch_size, self.mesh)
    # The schedule's value does not change the work per step; any horizon will do.
    optimizer, schedule = optim.create_optimizer(config, steps_per_epoch=1000,
                                                 num_train_steps=100_000)
    graphdef, self.state = train_step_lib.create_train_state(config, self.mesh, optimizer)
    # The state as the training loop carries it (config.state_layout).
    form = flat_state.form_for(config, self.state)
    self.videos = synthetic_videos(config, self.mesh, config.batch_size, seed=config.seed)
    # As the training loop compiles it; `compiler_options` add to these or override them.
    workarounds = xla_options.for_mesh(config.model.backbone, self.mesh)
    if without_montage:
      montage = montage_lib.make_montage_fn(config, self.mesh)
      # The first step's montage: then the first run() does what the full step's does.
      self.inputs = montage(self.videos,
                            jax.random.fold_in(self.state["rng"], self.state["step"]))
      step_fn = train_step_lib.jit_train_step(
          train_step_lib.make_update_step(config, graphdef, optimizer, schedule, form),
          self.mesh, num_batch_args=2, compiler_options=workarounds)
    else:
      self.inputs = (self.videos,)
      step_fn = train_step_lib.jit_train_step(
          train_step_lib.make_train_step(config, graphdef, self.mesh, optimizer, schedule,
                                         form), self.mesh, compiler_options=workarounds)
    self.state = form.jit_to_carried(mesh_lib.replicated_sharding(self.mesh))(self.state)
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, *self.inputs).compile(
        compiler_options=compiler_options)
    self.compile_time_s = time.perf_counter() - start

  def run(self) -> dict[str, jax.Array]:
    self.state, metrics = self.compiled(self.state, *self.inputs)
    return metrics

  def run_blocking(self) -> dict[str, jax.Array]:
    metrics = self.run()
    metrics["loss"].block_until_ready()
    return metrics


def benchmark_train_step(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                         time_montage: bool = True) -> dict[str, Any]:
  """Compiles and times the full jitted step (montage + augmentation + model + update).

  `config.batch_size` is the global batch. Returns figures keyed as in the benchmark's JSON.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps ({steps}) must be >= 1 and --warmup ({warmup}) >= 0.")
  step = CompiledStep(config)
  num_devices = step.mesh.size
  flops_per_device = flops_from_cost_analysis(step.compiled.cost_analysis())
  hlo_text = step.compiled.as_text()
  compiled_memory = _memory_analysis(step.compiled)
  step_time_s, step_times = median_time(step.run_blocking, steps=steps, warmup=warmup)
  chained_step_time_s, metrics = chained_time(step.run, steps=steps)
  final_loss = float(metrics["loss"])
  compile_time_s = step.compile_time_s
  mesh, videos = step.mesh, step.videos
  del step  # frees the state before the montage is compiled and timed

  device = jax.devices()[0]
  dtype = config.model.dtype
  peak = peak_flops(device.device_kind, dtype)
  # An SPMD program's cost analysis is per device (replicated work counted on each).
  flops_per_step = flops_per_device * num_devices if flops_per_device else None
  macs_per_video = forward_macs_per_video(config)
  # Training costs ~3x the forward pass (forward, input grads, weight grads); 2 FLOPs/MAC.
  model_flops_per_step = 6.0 * macs_per_video["model"] * config.batch_size
  figures = {
      "num_devices": num_devices,
      "compile_time_s": compile_time_s,
      "step_time_s": step_time_s,
      "step_times_s": step_times,
      "step_time_min_s": min(step_times),  # less sensitive to other load on a shared host
      "chained_step_time_s": chained_step_time_s,
      "videos_per_s": config.batch_size / step_time_s,
      "chained_videos_per_s": config.batch_size / chained_step_time_s,
      "videos_per_s_per_device": config.batch_size / step_time_s / num_devices,
      "forward_macs_per_video": macs_per_video["model"],
      "backbone_forward_macs_per_video": macs_per_video["backbone"],
      **utilisation(model_flops_per_step, flops_per_step, step_time_s, chained_step_time_s,
                    peak, num_devices),
      "peak_memory_bytes": peak_memory_bytes(device),
      "compiled_memory": compiled_memory,
      "collectives": collective_bytes(hlo_text),
      "final_loss": final_loss,
      "loss_is_finite": bool(np.isfinite(final_loss)),
  }
  if time_montage:
    figures.update(benchmark_montage(config, mesh, videos, steps=steps, warmup=warmup))
    figures["montage_share"] = figures["montage_time_s"] / step_time_s
  else:
    figures.update(montage_time_s=None, montage_share=None)
  return figures


def benchmark_montage(config: ml_collections.ConfigDict, mesh, videos: jax.Array, *,
                      steps: int, warmup: int) -> dict[str, Any]:
  """Times the jitted montage + augmentation alone on the step's input."""
  montage = montage_lib.make_montage_fn(config, mesh)
  jitted = jax.jit(montage, in_shardings=(mesh_lib.batch_sharding(mesh),
                                          mesh_lib.replicated_sharding(mesh)))
  key = jax.random.key(config.seed)
  compiled = jitted.lower(videos, key).compile()

  def run_montage():
    jax.block_until_ready(compiled(videos, key))

  montage_time_s, _ = median_time(run_montage, steps=steps, warmup=max(warmup, 1))
  return {"montage_time_s": montage_time_s,
          "montage_collectives": collective_bytes(compiled.as_text())}
