r"""Speed of the TCVM pretraining step, JAX vs a PyTorch reference (issue #6).

  python scripts/benchmark.py --config=configs/pretrain.py[:preset] [--batch_size=N] \
      [--dtype=bfloat16] [--steps=N] [--warmup=N] [--json=FILE] [--torch|--no_torch] \
      [--torch_compile] [--scaling_devices=1,2,4,8] [--input_pipeline]

Any config field can be overridden (`--config.data.num_frames=8`).

JAX: the jitted step (montage + augmentation + forward + backward + SGD) on
device-resident synthetic uint8 videos (B, T, input_size, input_size, 3), after compile
and warm-up: median step time, pseudo-videos/s, XLA's compiled FLOPs per step, FLOP/s,
MFU against the device's dense peak (null where unknown, e.g. CPU), a model-FLOPs MFU
(6 x forward MACs per video, counted from the jaxpr), peak device memory, and the share
of the step taken by the montage + augmentation timed alone on the same input.

PyTorch (benchmarks/torch_reference.py, its own process, run first so the two never share
a GPU or its CUDA libraries): the same step, i.e. the montage + augmentation of uint8
videos on the device (benchmarks/torch_montage.py), the same network, loss and SGD
update; also timed without the montage (on float pseudo-videos already on the device) and
the montage alone. `torch_ratio` = jax videos/s / torch videos/s, whole step against whole
step; `torch_ratio_without_montage` = both steps without their montage (JAX's step less
its montage timed alone); `torch_ratio_vs_torch_without_montage` = the whole JAX step
against torch's step without montage (the only ratio until the reference got its
montage, 2026-11-26); `torch_ratio_min` compares the fastest steps, steadier on a
shared CPU host. bf16 autocast when --dtype=bfloat16, channels-last(-3d) memory;
--torch_compile adds a torch.compile run (own process; model and montage compiled) and
the faster run counts.
--interleave=N (CPU) runs N rounds of: --interleave_block JAX steps, as many JAX steps
without the montage (on float pseudo-videos), as many torch steps and torch steps
without the montage (`ratio` whole vs whole, `ratio_model_only` without montage on both
sides), so all see the same load from other jobs on a shared host. The torch steps run in
a server process of their own (torch_reference.py --serve; torch.compile'd with
--torch_compile), and the first step of each block is not counted (cold caches): sharing
this process slowed PyTorch's step by 6-30 % (docs/performance.md).
--reuse_jax_json=FILE skips JAX and takes its figures from an earlier run's JSON (for a
later torch.compile-only run on the same machine). Parameter counts of the two models are
printed and must be equal (exit code 1 otherwise).

--scaling_devices: the step again in one subprocess per count with that many simulated
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=n), at a fixed per-device
batch; reports pseudo-videos/s per device and the montage's cross-device exchange.

Imports neither TensorFlow nor clu (the GPU machine has neither).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from absl import app, flags  # pylint: disable=g-import-not-at-top

import benchmarks
from benchmarks import step_flags  # defines --config, --batch_size, --dtype, --host_memory
from benchmarks import torch_process
from tcvm_jax import host_memory

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch reference too.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the PyTorch reference.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False,
                                   "Also time the reference under torch.compile (own "
                                   "process; compile time reported; the faster run counts).")
_TORCH_EAGER = flags.DEFINE_bool("torch_eager", True, "Time the eager reference.")
_TORCH_STEPS = flags.DEFINE_integer("torch_steps", None, "Timed torch steps (default --steps).")
_TORCH_TIMEOUT = flags.DEFINE_integer("torch_timeout_s", 900, "Kill the torch run after this.")
_MONTAGE = flags.DEFINE_bool("time_montage", True, "Time the montage alone for its share.")
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", [],
                                     "Simulated CPU device counts, e.g. 1,2,4,8.")
_SCALING_BATCH = flags.DEFINE_integer("scaling_per_device_batch", 4,
                                      "Per-device batch of the scaling runs.")
_SCALING_TIMEOUT = flags.DEFINE_integer("scaling_timeout_s", 900, "Per scaling run.")
_INPUT_PIPELINE = flags.DEFINE_bool("input_pipeline", False,
                                    "Also measure decoded clips/s per CPU core.")
_INTERLEAVE = flags.DEFINE_integer(
    "interleave", 0, "CPU only: also alternate this many rounds of JAX, JAX-without-montage, "
    "torch and torch-without-montage steps, --interleave_block steps of each per round "
    "(torch in a server process of its own, eager unless --torch_compile), so all see the "
    "same load from other jobs on a shared host; reported as `interleaved`. 0: off.",
    lower_bound=0)
_INTERLEAVE_BLOCK = flags.DEFINE_integer(
    "interleave_block", 4, "Steps of each kind per --interleave round; the first of each "
    "block is not counted (it starts with the caches the other program left).",
    lower_bound=2)
_REUSE_JAX_JSON = flags.DEFINE_string(
    "reuse_jax_json", None, "Skip the JAX step and take its figures from this earlier JSON "
    "(same config): for a later torch-only run, e.g. --torch_compile --notorch_eager.")


def log(message: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def run_torch_reference(config, *, steps: int, warmup: int, eager: bool, compiled: bool,
                        timeout_s: int, retain_host_memory: bool = False) -> dict[str, Any]:
  """The PyTorch reference, eager and/or torch.compile'd, each in its own process.

  Returns the faster run (the stronger reference) with both times attached, or
  {'skipped': why} when torch is missing or no run succeeded.
  """
  if importlib.util.find_spec("torch") is None:
    return {"skipped": "torch is not importable; PyTorch reference skipped (ratio null)."}
  if not (eager or compiled):
    return {"skipped": "--notorch_eager without --torch_compile: nothing to time."}
  request = dict(benchmarks.torch_reference_spec(config), batch_size=config.batch_size,
                 dtype=config.model.dtype, steps=steps, warmup=warmup, compile_model=False,
                 retain_host_memory=retain_host_memory)
  runs = {}
  if eager:
    runs["eager"] = torch_process.run_once(request, timeout_s)
  if compiled:
    log("PyTorch reference under torch.compile ...")
    runs["compiled"] = torch_process.run_once(dict(request, compile_model=True), timeout_s)
  good = {mode: run for mode, run in runs.items()
          if "skipped" not in run and (mode == "eager" or run.get("compiled"))}
  if not good:
    return {"skipped": "; ".join(run.get("skipped") or str(run.get("compile_error"))
                                 for run in runs.values())}
  best = dict(min(good.values(), key=lambda run: run["step_time_s"]))
  best["eager_step_time_s"] = good.get("eager", {}).get("step_time_s")
  best["compiled_step_time_s"] = good.get("compiled", {}).get("step_time_s")
  if "compiled" in runs and "compiled" not in good:
    best["compile_error"] = (runs["compiled"].get("skipped")
                             or runs["compiled"].get("compile_error"))
  return best


def _forwarded_config_args(argv: Sequence[str]) -> list[str]:
  """The --config / --config.x=y arguments (and --dtype, --host_memory) of this run, for
  subprocesses."""
  forwarded, take_next = [], False
  for arg in argv[1:]:
    if take_next:
      forwarded.append(arg)
      take_next = False
    elif arg.startswith(("--config", "--dtype", "--host_memory")):
      forwarded.append(arg)
      take_next = "=" not in arg  # `--config.x y` form: the value is the next argument.
  return forwarded


def run_scaling(argv: Sequence[str], device_counts: Sequence[int], per_device_batch: int, *,
                steps: int, warmup: int, timeout_s: int) -> list[dict[str, Any]]:
  """The step with n simulated CPU devices at a fixed per-device batch, one process each."""
  results = []
  for num_devices in device_counts:
    batch = per_device_batch * num_devices
    log(f"scaling: {num_devices} simulated CPU devices, global batch {batch}")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={num_devices}").strip())
    with tempfile.TemporaryDirectory() as tmp:
      result_path = os.path.join(tmp, "scaling.json")
      command = [sys.executable, os.path.abspath(__file__), *_forwarded_config_args(argv),
                 f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}",
                 "--no_torch", f"--json={result_path}"]
      entry: dict[str, Any] = {"num_devices": num_devices, "global_batch": batch}
      try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True,
                                   timeout=timeout_s)
        if completed.returncode != 0 or not os.path.exists(result_path):
          entry["error"] = completed.stderr.strip()[-800:]
        else:
          with open(result_path) as f:
            child = json.load(f)
          montage_collectives = child.get("montage_collectives") or {}
          step_collectives = child.get("collectives") or {}
          entry.update({
              "step_time_s": child["step_time_s"],
              "videos_per_s": child["videos_per_s"],
              "videos_per_s_per_device": child["videos_per_s_per_device"],
              "montage_time_s": child["montage_time_s"],
              "montage_share": child["montage_share"],
              # Bytes each device receives from the montage's clip exchange (per step),
              # whichever collectives it uses (all-gather or all-to-all rounds).
              "montage_exchange_bytes_per_device":
                  sum(v["bytes"] for v in montage_collectives.values()),
              "step_collective_bytes_per_device":
                  sum(v["bytes"] for v in step_collectives.values()),
              # By kind: what else moves between devices besides the exchange (the
              # gradient's all-reduce, the loss's gathers; anything more is a finding).
              "step_collectives": {kind: v for kind, v in step_collectives.items()
                                   if v["count"]},
          })
      except subprocess.TimeoutExpired:
        entry["error"] = f"did not finish in {timeout_s} s"
    if "error" in entry:
      log(f"scaling run with {num_devices} devices failed: {entry['error']}")
    results.append(entry)
  return results


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float) or scale != 1.0:
    return f"{value / scale:.{digits}g}{unit}"
  return f"{value}{unit}"


def format_table(results: dict[str, Any]) -> str:
  rows = [
      ("device", f"{results['device_kind']} x{results['num_devices']} ({results['backend']})"),
      ("config", f"{results['config']}  backbone={results['backbone']}"),
      ("shape", f"B={results['batch_size']}  T={results['num_frames']}  "
                f"{results['frame_size']}x{results['frame_size']}  s={results['num_clips']}  "
                f"dtype={results['dtype']}"),
      ("host memory retained", str(results.get("host_memory_retained"))),
      ("JAX compile", _fmt(results["compile_time_s"], " s")),
      ("JAX step (median)", _fmt(results["step_time_s"], " ms", 1e-3)),
      ("JAX step (min)", _fmt(results.get("step_time_min_s"), " ms", 1e-3)),
      ("JAX step (chained)", _fmt(results["chained_step_time_s"], " ms", 1e-3)),
      ("JAX pseudo-videos/s", _fmt(results["videos_per_s"])),
      ("JAX videos/s (chained)", _fmt(results.get("chained_videos_per_s"))),
      ("XLA FLOPs/step", _fmt(results["flops_per_step"], " GFLOP", 1e9)),
      ("FLOP/s by XLA's count", _fmt(results["flops_per_s"], " TFLOP/s", 1e12)),
      ("MFU by XLA's count", _fmt(results["xla_mfu"])),
      ("model FLOPs/step", _fmt(results["model_flops_per_step"], " GFLOP", 1e9)),
      ("MFU (6 x fwd MACs)", _fmt(results["mfu"])),
      ("MFU, chained steps", _fmt(results.get("chained_mfu"))),
      ("fwd GMACs/video", _fmt(results["forward_macs_per_video"], "", 1e9)),
      ("peak device memory", _fmt(results["peak_memory_bytes"], " GiB", 2**30)),
      ("montage + aug alone", _fmt(results["montage_time_s"], " ms", 1e-3)),
      ("montage share", _fmt(results["montage_share"])),
      ("torch step (median)", _fmt(results["torch_step_time_s"], " ms", 1e-3)),
      ("torch step (min)", _fmt(results["torch"].get("step_time_min_s"), " ms", 1e-3)),
      ("torch step (chained)", _fmt(results["torch"].get("chained_step_time_s"), " ms", 1e-3)),
      ("torch pseudo-videos/s", _fmt(results["torch_videos_per_s"])),
      ("torch step, no montage", _fmt(results.get("torch_model_step_time_s"), " ms", 1e-3)),
      ("torch montage alone", _fmt(results.get("torch_montage_time_s"), " ms", 1e-3)),
      ("torch eager step", _fmt(results["torch"].get("eager_step_time_s"), " ms", 1e-3)),
      ("torch compiled step", _fmt(results["torch"].get("compiled_step_time_s"), " ms", 1e-3)),
      ("ratio JAX/torch (v/s)", _fmt(results["torch_ratio"])),
      ("ratio, both less montage", _fmt(results.get("torch_ratio_without_montage"))),
      ("ratio vs torch no montage", _fmt(results.get("torch_ratio_vs_torch_without_montage"))),
      ("ratio from min steps", _fmt(results.get("torch_ratio_min"))),
      ("ratio, chained steps", _fmt(results.get("torch_ratio_chained"))),
      ("interleaved JAX / torch", (
          f"{results['interleaved']['jax_step_time_s'] * 1e3:.1f} ms / "
          f"{results['interleaved']['torch_step_time_s'] * 1e3:.1f} ms, ratio "
          f"{results['interleaved']['ratio']:.3g}"
          if results.get("interleaved") and "ratio" in results["interleaved"] else "n/a")),
      ("interleaved, no montage", (
          f"{results['interleaved']['jax_model_only_step_time_s'] * 1e3:.1f} ms / "
          f"{results['interleaved']['torch_model_only_step_time_s'] * 1e3:.1f} ms, ratio "
          f"{results['interleaved']['ratio_model_only']:.3g}"
          if results.get("interleaved") and "ratio" in results["interleaved"] else "n/a")),
      ("params JAX / torch", f"{results['params']['jax_total']} / "
                             f"{_fmt(results['params']['torch_total'])} (backbone "
                             f"{results['params']['jax_backbone']} / "
                             f"{_fmt(results['params']['torch_backbone'])})"),
      # Clips per CPU-second of the pipeline process = clips/s per fully used core.
      ("input clips/s/core", _fmt(results["input_clips_per_s_per_core"])),
      ("input wall clips/s", _fmt(results["input_pipeline"].get("clips_per_s"))),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f"{name:<{width}}  {value}" for name, value in rows]
  if results.get("notes"):
    lines += [f"note: {note}" for note in results["notes"]]
  if results.get("scaling"):
    lines.append("")
    lines.append("scaling (simulated CPU devices, fixed per-device batch)")
    lines.append(f"{'devices':>7} {'batch':>5} {'step ms':>9} {'videos/s':>9} "
                 f"{'v/s/dev':>8} {'montage ms':>10} {'share':>6} {'exchange MiB/dev':>16}")
    for entry in results["scaling"]:
      if "error" in entry:
        lines.append(f"{entry['num_devices']:>7} {entry['global_batch']:>5}  failed")
        continue
      exchange = entry["montage_exchange_bytes_per_device"]
      lines.append(
          f"{entry['num_devices']:>7} {entry['global_batch']:>5} "
          f"{entry['step_time_s'] * 1e3:>9.1f} {entry['videos_per_s']:>9.2f} "
          f"{entry['videos_per_s_per_device']:>8.2f} {entry['montage_time_s'] * 1e3:>10.1f} "
          f"{entry['montage_share']:>6.3f} "
          f"{(exchange or 0) / 2**20:>16.2f}")
    lines.append("the step's collectives per device (MiB, count):")
    for entry in results["scaling"]:
      if "error" not in entry:
        kinds = ", ".join(f"{kind} {v['bytes'] / 2**20:.2f} ({v['count']})"
                          for kind, v in entry.get("step_collectives", {}).items())
        lines.append(f"{entry['num_devices']:>7}  {kinds or 'none'}")
  return "\n".join(lines)


def jax_section(config, config_arg: str, notes: list[str]) -> dict[str, Any]:
  """Times the JAX step; returns its figures plus the run's environment."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax
  from benchmarks import jax_step

  device = jax.devices()[0]
  log(f"JAX {jax.__version__} on {device.device_kind} x{jax.device_count()}: "
      f"compiling the step ...")
  figures = jax_step.benchmark_train_step(config, steps=_STEPS.value, warmup=_WARMUP.value,
                                          time_montage=_MONTAGE.value)
  log(f"JAX step {figures['step_time_s'] * 1e3:.1f} ms (compiled in "
      f"{figures['compile_time_s']:.1f} s)")
  params = jax_step.parameter_counts(config)
  if figures["mfu"] is None:
    notes.append(f"No known peak FLOP/s for {device.device_kind!r}: MFU is null, FLOP/s "
                 f"reported.")
  return {
      "device": str(device),
      "device_kind": device.device_kind,
      "backend": jax.default_backend(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "load_average": os.getloadavg(),  # other jobs on a shared host skew CPU timings
      "python": platform.python_version(),
      "jax_version": jax.__version__,
      "flax_version": flax.__version__,
      "config": config_arg,
      "config_values": config.to_dict(),
      "preset": config.preset,
      "backbone": config.model.backbone,
      "batch_size": config.batch_size,
      "num_frames": config.data.num_frames,
      "num_clips": config.montage.num_clips,
      "input_size": config.data.input_size,
      "frame_size": config.montage.output_size,
      "dtype": config.model.dtype,
      "steps": _STEPS.value,
      "warmup": _WARMUP.value,
      **figures,
      "jax_params": params,
  }


def reused_jax_section(path: str, config) -> dict[str, Any]:
  """The JAX figures of an earlier run of the same setting (see --reuse_jax_json)."""
  with open(path) as f:
    earlier = json.load(f)
  for key, value in (("backbone", config.model.backbone), ("batch_size", config.batch_size),
                     ("dtype", config.model.dtype), ("num_frames", config.data.num_frames),
                     ("frame_size", config.montage.output_size)):
    if earlier.get(key) != value:
      raise app.UsageError(f"--reuse_jax_json={path} has {key}={earlier.get(key)!r}, this "
                           f"run {value!r}: not the same setting.")
  keep = {key: value for key, value in earlier.items()
          if not key.startswith("torch") and key not in ("params", "params_match", "notes")}
  keep["jax_figures_from"] = path
  keep["jax_params"] = {"total_params": earlier["params"]["jax_total"],
                        "backbone_params": earlier["params"]["jax_backbone"]}
  return keep


def run_interleaved(config, *, rounds: int, block: int, warmup: int, timeout_s: int,
                    retain_host_memory: bool, compile_torch: bool = False) -> dict[str, Any]:
  """Rounds of `block` steps of each: JAX, JAX without montage, torch, torch without
  montage (CPU; --interleave; torch.compile'd torch steps with `compile_torch`).

  The torch steps run in a server process (benchmarks/torch_process.py) between ours, so
  both see the same load from other jobs while keeping their own heaps (in this process
  PyTorch's step ran 6-30 % slower). The first step of each block is not counted: it
  starts with caches full of the other program's data (kept as
  `first_in_block_step_times_s`).
  """
  if rounds < 1 or block < 2:
    raise ValueError(f"--interleave ({rounds}) must be >= 1 and --interleave_block ({block}) "
                     ">= 2 (the first step of each block is not counted).")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from benchmarks import jax_step

  if jax.default_backend() != "cpu":
    return {"skipped": "--interleave is for CPU hosts; on a GPU the two would share it."}
  if importlib.util.find_spec("torch") is None:
    return {"skipped": "torch is not importable; --interleave skipped."}

  request = dict(benchmarks.torch_reference_spec(config), batch_size=config.batch_size,
                 dtype=config.model.dtype, warmup=warmup, compile_model=compile_torch,
                 retain_host_memory=retain_host_memory)
  try:
    torch_server = torch_process.TorchStepServer(request, timeout_s)
  except RuntimeError as error:
    return {"skipped": f"--interleave: {error}"}
  try:
    jax_compiled = jax_step.CompiledStep(config)
    # Like for like: the JAX step without the montage, on float pseudo-videos as torch's.
    jax_model_only = jax_step.CompiledStep(config, without_montage=True)

    def timed(run):
      start = time.perf_counter()
      run()
      return time.perf_counter() - start

    runs = {"jax": lambda: timed(jax_compiled.run_blocking),
            "jax_model_only": lambda: timed(jax_model_only.run_blocking),
            "torch": lambda: torch_server.step("step"),
            "torch_model_only": lambda: torch_server.step("model_step")}
    for _ in range(warmup):
      for name in ("jax", "jax_model_only"):
        runs[name]()
    times = {name: [] for name in runs}
    first_in_block = {name: [] for name in runs}
    for _ in range(rounds):
      for name, run in runs.items():
        # Not counted: it starts with the caches the other program left.
        first_in_block[name].append(run())
        times[name].extend(run() for _ in range(block - 1))
  except RuntimeError as error:  # the torch server died or stopped answering
    return {"skipped": f"--interleave: {error}"}
  finally:
    torch_server.close()
  medians = {name: float(np.median(values)) for name, values in times.items()}

  def per_pair_median(numerator, denominator):
    return float(np.median(np.array(times[numerator]) / np.array(times[denominator])))

  return {
      "rounds": rounds,
      "block": block,
      "steps_counted": rounds * (block - 1),
      "torch_process": "separate (benchmarks/torch_reference.py --serve)",
      "torch_compiled": torch_server.compiled,
      "jax_step_time_s": medians["jax"],
      "jax_model_only_step_time_s": medians["jax_model_only"],
      "torch_step_time_s": medians["torch"],
      "torch_model_only_step_time_s": medians["torch_model_only"],
      "jax_step_times_s": times["jax"],
      "jax_model_only_step_times_s": times["jax_model_only"],
      "torch_step_times_s": times["torch"],
      "torch_model_only_step_times_s": times["torch_model_only"],
      "first_in_block_step_times_s": first_in_block,
      # jax videos/s over torch videos/s, as torch_ratio: the whole steps, the steps
      # without their montage, and the whole JAX step against torch's without montage.
      "ratio": medians["torch"] / medians["jax"],
      "ratio_model_only": medians["torch_model_only"] / medians["jax_model_only"],
      "ratio_vs_torch_without_montage": medians["torch_model_only"] / medians["jax"],
      # Per adjacent pair of counted steps, then the median: steadier when the load drifts.
      "ratio_per_pair_median": per_pair_median("torch", "jax"),
      "ratio_model_only_per_pair_median": per_pair_median("torch_model_only",
                                                          "jax_model_only"),
  }


def write_json(results: dict[str, Any]) -> None:
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1, default=str)


def main(argv: Sequence[str]) -> int:
  config = step_flags.config_from_flags()
  del argv  # absl leaves only positional arguments; flags are read from sys.argv.
  config_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")),
                    "configs/pretrain.py")
  notes: list[str] = []
  # Before JAX starts its CPU client (see tcvm_jax/host_memory.py); the torch reference
  # gets the same setting, so neither framework is timed with the other's allocator.
  host_memory_retained = host_memory.configure(step_flags.HOST_MEMORY.value)

  # 1. PyTorch first, in its own process: it must not find a GPU already claimed by JAX.
  torch_figures: dict[str, Any] = {"skipped": "--no_torch: PyTorch reference not run."}
  if _TORCH.value and not _NO_TORCH.value:
    log("PyTorch reference (own process) ...")
    torch_figures = run_torch_reference(
        config, steps=_TORCH_STEPS.value or _STEPS.value, warmup=_WARMUP.value,
        eager=_TORCH_EAGER.value, compiled=_TORCH_COMPILE.value,
        timeout_s=_TORCH_TIMEOUT.value, retain_host_memory=host_memory_retained)
    if "skipped" not in torch_figures:
      log(f"torch step {torch_figures['step_time_s'] * 1e3:.1f} ms on "
          f"{torch_figures['device_name']} (compiled={torch_figures['compiled']})")
  torch_ok = "skipped" not in torch_figures
  if not torch_ok:
    log(torch_figures["skipped"])
    notes.append(torch_figures["skipped"])
  else:
    if torch_figures.get("compile_error"):
      notes.append(f"torch.compile did not give a timing: {torch_figures['compile_error']}")

  # Partial figures first, so a run killed by a timeout still leaves the torch figures.
  write_json({"partial": True, "config": config_arg, "torch": torch_figures, "notes": notes})

  # 2. JAX.
  if _REUSE_JAX_JSON.value:
    results = reused_jax_section(_REUSE_JAX_JSON.value, config)
  else:
    results = jax_section(config, config_arg, notes)
  jax_params = results.pop("jax_params")

  params = {"jax_total": jax_params["total_params"],
            "jax_backbone": jax_params["backbone_params"],
            "torch_total": torch_figures.get("total_params"),
            "torch_backbone": torch_figures.get("backbone_params")}
  params_match = None
  if torch_ok:
    params_match = (params["jax_backbone"] == params["torch_backbone"]
                    and params["jax_total"] == params["torch_total"])

  input_figures: dict[str, Any] = {"input_clips_per_s_per_core": None}
  if _INPUT_PIPELINE.value:
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
    log("input pipeline ...")
    input_figures = input_pipeline.measure(config, config_arg)
    if input_figures.get("input_clips_per_s_per_core") is None:
      notes.append(input_figures.get("input_pipeline_note", "input pipeline not measured."))

  scaling = results.get("scaling")
  if _SCALING_DEVICES.value:
    counts = [int(n) for n in _SCALING_DEVICES.value]
    if any(n < 1 for n in counts):
      raise app.UsageError(f"--scaling_devices={counts}: counts must be >= 1.")
    scaling = run_scaling(sys.argv, counts, _SCALING_BATCH.value, steps=_STEPS.value,
                          warmup=_WARMUP.value, timeout_s=_SCALING_TIMEOUT.value)
    if max(counts) > (os.cpu_count() or 1):
      notes.append(f"Scaling: {max(counts)} simulated devices share {os.cpu_count()} CPU "
                   f"cores, so videos/s per device mostly shows compute sharing; the "
                   f"montage's exchange bytes per device are exact.")

  interleaved = None
  if _INTERLEAVE.value:
    log(f"interleaving {_INTERLEAVE.value} rounds of {_INTERLEAVE_BLOCK.value} JAX and torch "
        "steps (torch in its own process) ...")
    interleaved = run_interleaved(config, rounds=_INTERLEAVE.value,
                                  block=_INTERLEAVE_BLOCK.value, warmup=_WARMUP.value,
                                  timeout_s=_TORCH_TIMEOUT.value,
                                  retain_host_memory=host_memory_retained,
                                  compile_torch=_TORCH_COMPILE.value)
    if "skipped" in interleaved:
      notes.append(interleaved["skipped"])

  torch_videos_per_s = torch_figures["videos_per_s"] if torch_ok else None
  results.update({
      "torch_step_time_s": torch_figures["step_time_s"] if torch_ok else None,
      "torch_videos_per_s": torch_videos_per_s,
      "torch_ratio": (results["videos_per_s"] / torch_videos_per_s
                      if torch_videos_per_s else None),
      # Without the montage on both sides: the JAX step less its montage (timed alone), vs
      # the torch step on already-augmented pseudo-videos.
      "torch_ratio_without_montage": (
          torch_figures["model_step_time_s"]
          / (results["step_time_s"] - results["montage_time_s"])
          if torch_ok and results.get("montage_time_s") is not None
          and results["step_time_s"] > results["montage_time_s"] else None),
      # The whole JAX step against the torch step without montage (the only ratio until
      # the reference got its montage, 2026-11-26).
      "torch_ratio_vs_torch_without_montage": (
          torch_figures["model_step_time_s"] / results["step_time_s"] if torch_ok else None),
      "torch_model_step_time_s": torch_figures["model_step_time_s"] if torch_ok else None,
      "torch_montage_time_s": torch_figures["montage_time_s"] if torch_ok else None,
      # Both steps dispatched back to back (as in training), one wait at the end.
      "torch_ratio_chained": (torch_figures["chained_step_time_s"]
                              / results["chained_step_time_s"]
                              if torch_ok and torch_figures.get("chained_step_time_s")
                              and results.get("chained_step_time_s") else None),
      # The same ratio from the fastest step of each: steadier on a shared CPU host.
      "torch_ratio_min": (torch_figures["step_time_min_s"] / results["step_time_min_s"]
                          if torch_ok and results.get("step_time_min_s") else None),
      "torch_compiled": torch_figures.get("compiled"),
      "torch_compile_time_s": torch_figures.get("compile_time_s"),
      "torch": torch_figures,
      "params": params,
      "params_match": params_match,
      "input_clips_per_s_per_core": input_figures.get("input_clips_per_s_per_core"),
      "input_pipeline": input_figures,
      "scaling": scaling,
      "interleaved": interleaved,
      "host_memory_retained": host_memory_retained,
      "tensorflow_imported": "tensorflow" in sys.modules,
      "clu_imported": "clu" in sys.modules,
      "notes": notes,
  })
  results["partial"] = False
  print(format_table(results), flush=True)
  if _JSON.value:
    write_json(results)
    log(f"wrote {_JSON.value}")
  if params_match is False:
    print(f"ERROR: parameter counts differ between JAX and the torch reference: {params}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
