"""The pretraining loop: input -> sharded train step -> metrics, checkpoints, exports.

`train_and_evaluate(config, workdir)` runs (or resumes) one pretraining run and returns
its final metrics. Layout of `workdir`:

  checkpoints/<step>/   orbax checkpoints (train state + data position), the last K kept.
  encoder/              the exported backbone for fine-tuning (checkpointing.load_encoder).
  results.json          final metrics, the config and software versions.
  events.out.tfevents*  TensorBoard scalars `train/...` (process 0).

Input: a background thread (tcvm_jax.prefetch) reads the next batches and copies them to
the devices while the step runs, INPUT_PREFETCH_BATCHES ahead.

Faults: a restart continues from the newest finished checkpoint, with the input stream
skipped to the same position; SIGTERM (preemption) saves at the next step boundary and
returns; a non-finite loss raises `NonFiniteLossError` without touching the checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from tcvm_jax import checkpointing
from tcvm_jax import config_validation
from tcvm_jax import flat_state
from tcvm_jax.config_files import load_config_file
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import metrics as metrics_lib
from tcvm_jax import optim
from tcvm_jax import prefetch
from tcvm_jax import train_step as train_step_lib
from tcvm_jax import xla_options

RESULTS_FILENAME = "results.json"
RETRIEVAL_CONFIG = "configs/retrieval.py"  # presets named by config.eval_retrieval
# Nominal size of the 'random' source, so that epochs mean something for it.
RANDOM_NUM_VIDEOS = 1024
# Metrics whose non-finite value stops the run (a NaN anywhere poisons the parameters).
_FINITE_METRICS = ("loss", "grad_norm", "param_norm")
# Global batches made and copied to the devices ahead of the step (by a background
# thread): the input and the host -> device copy overlap the step. Each waiting batch
# holds device memory (R3D50 at batch 32: 50 MB of uint8 video).
INPUT_PREFETCH_BATCHES = 2


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient) stopped being finite; the message names step and checkpoint."""


# --- Input --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainInput:
  """The training stream of this process.

  num_videos: training videos in the whole dataset (all processes), for epochs -> steps.
  make_iterator(start_batch): host batches {'video': uint8 (b, T, S, S, 3), ...} of this
    process, starting at global batch number `start_batch` (a resumed run skips exactly
    the batches it has already trained on).
  """

  num_videos: int
  make_iterator: Callable[[int], Iterator[dict[str, np.ndarray]]]


def random_video_batches(config: ml_collections.ConfigDict, *, process_index: int,
                         batch_size_per_process: int,
                         start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """uint8 noise videos; video i of global batch b depends only on (seed, b, i).

  A debugging / benchmarking source that needs no files: the global batch is the same
  for any number of processes, which makes multi-process runs comparable exactly. Each
  video is the raw (little-endian) output of its own SFC64 generator seeded with
  (seed, b, i): ~4x faster than `Generator.integers(0, 256)` (docs/training.md), and
  NumPy releases the GIL while it makes the bits (the prefetch thread runs alongside).
  """
  shape = (config.data.num_frames, config.data.input_size, config.data.input_size, 3)
  num_bytes = math.prod(shape)
  num_words = -(-num_bytes // 8)  # 64-bit words per video, the last one maybe in part
  first_video = process_index * batch_size_per_process
  batch_index = start_batch
  while True:
    videos = np.empty((batch_size_per_process, num_bytes), np.uint8)
    for row in range(batch_size_per_process):
      words = np.random.SFC64([config.seed, batch_index, first_video + row]).random_raw(
          num_words).astype("<u8", copy=False)  # a no-op on little-endian hosts
      videos[row] = words.view(np.uint8)[:num_bytes]
    video_index = (batch_index * config.batch_size + first_video
                   + np.arange(batch_size_per_process))
    yield {"video": videos.reshape((batch_size_per_process,) + shape),
           "video_index": video_index.astype(np.int64),
           "label": np.full((batch_size_per_process,), -1, np.int64)}
    batch_index += 1


def create_train_input(config: ml_collections.ConfigDict, *, process_index: int,
                       process_count: int) -> TrainInput:
  """Picks the source named by `config.data.name` (TensorFlow is imported only here)."""
  batch_size_per_process = config.batch_size // process_count
  if config.data.name == "random":
    return TrainInput(
        num_videos=RANDOM_NUM_VIDEOS,
        make_iterator=lambda start_batch: random_video_batches(
            config, process_index=process_index,
            batch_size_per_process=batch_size_per_process, start_batch=start_batch))
  from tcvm_jax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  if config.data.name == "synthetic" and process_count > 1:
    # Process 0 generates; the others then find it (shared disk) or make their own copy.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if process_index == 0:
      pipeline.num_train_records(config)
    multihost_utils.sync_global_devices("synthetic dataset ready")
  num_videos = pipeline.num_train_records(config)  # generates 'synthetic' on first use
  return TrainInput(
      num_videos=num_videos,
      make_iterator=lambda start_batch: pipeline.make_train_dataset(
          config, process_index=process_index, process_count=process_count,
          batch_size_per_process=batch_size_per_process, seed=config.seed,
          start_step=start_batch))


# --- Preemption ---------------------------------------------------------------------


class PreemptionWatcher:
  """True once the job was asked to stop (SIGTERM), at the same step on every process.

  One process: our own SIGTERM handler sets a flag. Several processes: JAX's preemption
  sync service (started by jax.distributed.initialize) catches SIGTERM and agrees on a
  step at which every process saves; installing our own handler would bypass it.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous_handler = None
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")
    self._requested.set()

  def reached(self, step: int) -> bool:
    if not self._multiprocess:
      return self._requested.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is switched off
      return False

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


# --- Helpers ------------------------------------------------------------------------


def num_train_steps_for(config: ml_collections.ConfigDict, num_videos: int) -> tuple[int, int]:
  """(steps_per_epoch, num_train_steps); `config.num_train_steps` > 0 overrides epochs."""
  steps_per_epoch = num_videos // config.batch_size
  if steps_per_epoch < 1:
    raise config_validation.ConfigError(
        f"config.batch_size={config.batch_size}: larger than the training set "
        f"({num_videos} videos); choose at most {num_videos}.")
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, max(int(math.ceil(config.num_epochs * steps_per_epoch)), 1)


def software_versions() -> dict[str, str]:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  versions = {"python": platform.python_version()}
  for package in ("tcvm_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "ml-collections", "clu", "numpy", "tensorflow", "tensorflow-cpu"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def _to_floats(values: Mapping[str, Any]) -> dict[str, float]:
  return {name: float(np.asarray(value)) for name, value in values.items()}


def write_results(workdir: str, results: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> str:
  path = os.path.join(workdir, RESULTS_FILENAME)
  payload = {
      **results,
      "config": json.loads(config.to_json_best_effort()),
      "versions": software_versions(),
      "devices": {"platform": jax.devices()[0].platform, "device_count": jax.device_count(),
                  "process_count": jax.process_count()},
  }
  tmp_path = path + ".tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp_path, path)  # never a half-written results.json
  return path


# --- The loop -----------------------------------------------------------------------


class StepMetrics:
  """Reads step metrics on the host, checks them and keeps interval means.

  Reading a step's metrics waits for that step, so the loop reads one step behind the
  device (the host prepares the next batch meanwhile) except where it needs them now.
  """

  def __init__(self, on_non_finite: Callable[[int, dict[str, float]], None]):
    self._pending: list[tuple[int, Any]] = []  # (step, device metrics), oldest first
    self._on_non_finite = on_non_finite
    self.accumulator = metrics_lib.MeanAccumulator()
    self.last: dict[str, float] = {}

  def push(self, step: int, device_metrics: Any) -> None:
    self._pending.append((step, device_metrics))

  def read(self, keep_newest: int = 0) -> None:
    while len(self._pending) > keep_newest:
      step, device_metrics = self._pending.pop(0)
      host_metrics = _to_floats(jax.device_get(device_metrics))
      bad = {name: host_metrics[name] for name in _FINITE_METRICS
             if name in host_metrics and not math.isfinite(host_metrics[name])}
      if bad:
        self._on_non_finite(step, bad)
      self.accumulator.add(host_metrics)
      self.last = host_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (resuming from `workdir` if it holds checkpoints); returns final metrics.

  The returned dict holds `step`, the last step's metrics (`loss`, `loss_origin`, ...),
  `history` (interval means at every logging step of this run), `preempted` and
  `resumed_from_step`. Raises ConfigError for a bad config (before any work) and
  NonFiniteLossError when training diverges.
  """
  # Installed first, so that a SIGTERM during set-up or compilation is honoured at the
  # first step boundary instead of killing the job.
  preemption = PreemptionWatcher()
  try:
    return _train(config, os.path.abspath(workdir), preemption)
  finally:
    preemption.close()


def _restore(checkpointer: checkpointing.Checkpointer, state: Any,
             config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
  """The newest checkpoint's state and data position, or `state` and a fresh position."""
  position = {"batches_consumed": 0, "last_metrics": {}}
  if checkpointer.latest_step() is None:
    return state, position
  state, saved_position = checkpointer.restore(state)
  saved_batch_size = saved_position.get("global_batch_size", config.batch_size)
  if saved_batch_size != config.batch_size:
    raise config_validation.ConfigError(
        f"config.batch_size={config.batch_size}: the checkpoint in {checkpointer.directory} "
        f"was written with batch_size={saved_batch_size}; resume with that value or use a "
        f"fresh --workdir.")
  return state, {**position, **saved_position}


def _train(config: ml_collections.ConfigDict, workdir: str,
           preemption: PreemptionWatcher) -> dict[str, Any]:
  started = time.time()
  config_validation.validate_config(config, num_devices=jax.device_count(),
                                    num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh()
  logging.info("Devices: %d x %s over %d process(es); global batch %d (%d per device).",
               jax.device_count(), jax.devices()[0].platform, jax.process_count(),
               config.batch_size, config.batch_size // jax.device_count())

  train_input = create_train_input(config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  steps_per_epoch, num_train_steps = num_train_steps_for(config, train_input.num_videos)
  logging.info("%d training videos, %d steps per epoch, %d steps in total.",
               train_input.num_videos, steps_per_epoch, num_train_steps)
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch, num_train_steps)
  graphdef, state = train_step_lib.create_train_state(config, mesh, optimizer)
  # The loop carries the state in its flat form (config.state_layout 'flat', the default:
  # less host time per step, one update pass) and rebuilds the tree only to save or export.
  form = flat_state.form_for(config, state)
  step_fn = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(config, graphdef, mesh, optimizer, schedule, form), mesh,
      compiler_options=xla_options.for_mesh(config.model.backbone, mesh))
  replicated = mesh_lib.replicated_sharding(mesh)
  to_carried, to_tree = form.jit_to_carried(replicated), form.jit_to_tree(replicated)

  writer = metrics_lib.create_writer(workdir, is_primary=jax.process_index() == 0)
  checkpointer = checkpointing.Checkpointer(
      checkpointing.checkpoints_directory(workdir), every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints)
  batches = None
  try:
    resumed_from = checkpointer.latest_step()
    state, position = _restore(checkpointer, state, config)
    batches_consumed = int(position["batches_consumed"])
    if resumed_from is None:
      writer.write_hparams(_flat_hparams(config))
    else:
      logging.info("Resumed from the checkpoint at step %d (%d batches consumed).",
                   resumed_from, batches_consumed)
    step = int(jax.device_get(state["step"]))
    state = to_carried(state)  # what step_fn takes and returns

    def stop_on_non_finite(bad_step: int, bad: dict[str, float]) -> None:
      checkpointer.wait()  # what was saved before is complete, and nothing more is saved
      latest = checkpointer.latest_step()
      where = (f"The last good checkpoint is step {latest} in {checkpointer.directory}; "
               f"it is left intact and a restart resumes from it" if latest is not None
               else "No checkpoint was written yet")
      raise NonFiniteLossError(
          f"Non-finite training metrics at step {bad_step}: {bad}. Training stopped. "
          f"{where}. Lower config.base_learning_rate or check the input data.")

    step_metrics = StepMetrics(stop_on_non_finite)
    step_metrics.last = dict(position["last_metrics"])
    if step < num_train_steps:
      # A background thread reads the next batches and copies them to the devices while
      # the step runs; exactly the batches this run trains on are read (no more: islice),
      # and `batches_consumed` counts only those the loop took. Errors surface in next().
      batches = prefetch.Prefetcher(
          itertools.islice(train_input.make_iterator(batches_consumed),
                           num_train_steps - step),
          lambda batch: mesh_lib.host_batch_to_global(batch["video"], mesh),
          depth=INPUT_PREFETCH_BATCHES, name="train-input-prefetch")
    throughput = metrics_lib.Throughput(start_step=step, num_train_steps=num_train_steps,
                                        clips_per_step=config.batch_size)
    report_progress = metrics_lib.create_report_progress(num_train_steps,
                                                         config.log_every_steps)
    history: list[dict[str, float]] = []
    preempted = False
    compiled = False
    if step >= num_train_steps:
      logging.info("Step %d >= num_train_steps=%d: nothing left to train.", step,
                   num_train_steps)

    while step < num_train_steps:
      videos = next(batches)  # a global array sharded over `data`, already on the devices
      if not compiled:
        logging.info("Compiling the train step (first step)...")
        compile_started = time.time()
      state, device_metrics = step_fn(state, videos)
      batches_consumed += 1
      step += 1
      step_metrics.push(step, device_metrics)
      if not compiled:
        jax.block_until_ready(device_metrics)
        logging.info("First step done in %.1fs (compilation included).",
                     time.time() - compile_started)
        throughput.restart(step)  # the ETA should not count compilation
        compiled = True

      preempted = preemption.reached(step)
      is_last = step == num_train_steps
      must_save = preempted or is_last or checkpointer.should_save(step)
      must_log = step % config.log_every_steps == 0 or is_last
      step_metrics.read(keep_newest=0 if (must_save or must_log) else 1)
      if must_log and len(step_metrics.accumulator):
        means = step_metrics.accumulator.pop_means()
        speed = throughput.measure(step)
        writer.write_scalars(step, metrics_lib.train_scalars(means, speed))
        logging.info("%s", metrics_lib.progress_line(step, num_train_steps, means, speed))
        history.append({"step": step, **means})
      report_progress(step)
      if must_save:
        with report_progress.timed("checkpoint"):
          data_position = {"batches_consumed": batches_consumed,
                           "global_batch_size": config.batch_size, "seed": config.seed,
                           "last_metrics": step_metrics.last}
          checkpointer.save(step, to_tree(state), data_position, force=preempted or is_last)
      if preempted:
        checkpointer.wait()
        logging.warning("Preempted: the checkpoint at step %d is saved; stopping.", step)
        break
    step_metrics.read()
    checkpointer.wait()

    if not preempted:
      state = to_tree(state)
      checkpointing.save_encoder(os.path.join(workdir, checkpointing.ENCODER_DIRNAME),
                                 state["params"], state["batch_stats"], config)
  finally:
    if batches is not None:
      batches.close()  # stops the input thread (also on errors and preemption)
    checkpointer.close()  # waits for pending saves: what was started gets finished
    writer.flush()

  results = {"step": step, **step_metrics.last, "num_train_steps": num_train_steps,
             "steps_per_epoch": steps_per_epoch, "preempted": preempted,
             "resumed_from_step": resumed_from, "history": history}
  if retrieval_preset(config) and not preempted:
    if config.data.name == "random":
      logging.warning("Skipping config.eval_retrieval=%r: data.name='random' has no labels.",
                      config.eval_retrieval)
    else:
      results["retrieval"] = evaluate_retrieval(config, workdir)
  results["wall_time_seconds"] = time.time() - started
  if jax.process_index() == 0 and not preempted:
    path = write_results(workdir, results, config)
    logging.info("Wrote %s (step %d, loss %.4f).", path, step,
                 step_metrics.last.get("loss", math.nan))
  return results


def retrieval_preset(config: ml_collections.ConfigDict) -> str:
  """The configs/retrieval.py preset to evaluate with after training; '' for none.

  'none' also means none: the command line cannot set an empty string.
  """
  preset = config.get("eval_retrieval", "") or ""
  return "" if preset == "none" else preset


def evaluate_retrieval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Video retrieval with the just-exported encoder (`config.eval_retrieval` preset of
  configs/retrieval.py), on the same data; writes WORKDIR/retrieval/results.{json,md}."""
  from tcvm_jax import retrieval  # pylint: disable=g-import-not-at-top (imports train)
  eval_config = load_config_file(RETRIEVAL_CONFIG, retrieval_preset(config))
  eval_config.init_checkpoint = workdir
  eval_config.random_baseline = False
  if config.data.name == "synthetic" and eval_config.data.name == "synthetic":
    # The dataset this run trained on, wherever it was generated.
    eval_config.data.synthetic_dir = config.data.synthetic_dir
    if "synthetic_params" in config.data:
      eval_config.data.synthetic_params = ml_collections.ConfigDict(
          config.data.synthetic_params.to_dict())
  logging.info("Retrieval evaluation (%s:%s) of the exported encoder...", RETRIEVAL_CONFIG,
               retrieval_preset(config))
  results = retrieval.run(eval_config, os.path.join(workdir, "retrieval"))
  return {key: value for key, value in results.items() if key.startswith("top")}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Scalars of the config for TensorBoard's hparams tab (`model.backbone`, ...)."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(value, name + ".")
      elif isinstance(value, (bool, int, float, str)):
        flat[name] = value
      elif value is not None:
        flat[name] = str(value)

  visit(config, "")
  return flat
