"""Checks a pretraining config before any work starts (no data read, nothing compiled).

Every error is a `ConfigError` (a ValueError) whose message starts with the field's full
name and states the allowed range or choices, e.g.

  config.model.tc_k=1.5: must lie in [0, 1] (share of channels that take differences).

Paths are checked here too, so a typo in `data.train_pattern` fails in a second rather
than after compilation.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Sequence

import ml_collections

from tcvm_jax import augment, backbones, flat_state, layers, losses, montage, optim, stem

# 'random': uint8 noise videos made on the fly (tests, benchmarks; no files needed).
DATA_NAMES = ("tfrecord", "synthetic", "random")
SAMPLERS = ("dense", "tsn")
SHORT_VIDEO_MODES = ("loop", "pad")
MONTAGE_VARIANTS = montage.VARIANTS
BACKBONES = tuple(sorted(backbones.BACKBONES))
DTYPES = ("float32", "bfloat16")
POSITIVE_REDUCTIONS = losses.POSITIVE_REDUCTIONS
SCHEDULES = optim.SCHEDULES
PRESETS = ("r3d50", "tsm50", "demo")
RETRIEVAL_PRESETS = ("ucf101", "hmdb51", "demo")  # configs/retrieval.py


class ConfigError(ValueError):
  """A config value outside its allowed range; the message names the field."""


def _fail(field: str, value: Any, requirement: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {requirement}")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing; start from configs/pretrain.py.")
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
      value)


def check_int(config, field: str, low: int | None = None, high: int | None = None,
              allowed: Sequence[int] = ()) -> int:
  value = _get(config, field)
  if value in allowed and _is_int(value):
    return value
  bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
  extra = f" or one of {tuple(allowed)}" if allowed else ""
  if not _is_int(value):
    _fail(field, value, f"must be an integer in {bounds}{extra}.")
  if (low is not None and value < low) or (high is not None and value > high):
    _fail(field, value, f"must be an integer in {bounds}{extra}.")
  return value


def check_number(config, field: str, low: float | None = None, high: float | None = None,
                 *, low_open: bool = False, high_open: bool = False) -> float:
  value = _get(config, field)
  left = "(" if low_open or low is None else "["
  right = ")" if high_open or high is None else "]"
  bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
  if not _is_number(value):
    _fail(field, value, f"must be a finite number in {bounds}.")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    _fail(field, value, f"must lie in {bounds}.")
  return value


def check_choice(config, field: str, choices: Sequence[Any]) -> Any:
  value = _get(config, field)
  if value not in choices:
    _fail(field, value, f"choose one of {tuple(choices)}.")
  return value


def check_bool(config, field: str) -> bool:
  value = _get(config, field)
  if not isinstance(value, bool):
    _fail(field, value, "must be True or False.")
  return value


def check_range_pair(config, field: str, low: float, high: float, *,
                     low_open: bool = False) -> tuple[float, float]:
  value = tuple(_get(config, field))
  left = "(" if low_open else "["
  if (len(value) != 2 or not all(_is_number(v) for v in value) or value[0] > value[1]
      or (value[0] <= low if low_open else value[0] < low) or value[1] > high):
    _fail(field, value, f"must be a (min, max) pair with {left}{low} <= min <= max <= {high}].")
  return value


def _validate_data(config, check_paths: bool) -> None:
  name = check_choice(config, "data.name", DATA_NAMES)
  num_frames = check_int(config, "data.num_frames", 1)
  check_int(config, "data.frame_stride", 1)
  check_choice(config, "data.sampler", SAMPLERS)
  check_choice(config, "data.short_video", SHORT_VIDEO_MODES)
  check_int(config, "data.input_size", 1)
  check_int(config, "data.shuffle_buffer", 1)
  check_number(config, "data.max_bad_record_fraction", 0.0, 1.0)
  num_clips = check_int(config, "montage.num_clips", 2)
  if num_frames % num_clips:
    _fail("data.num_frames", num_frames,
          f"must be divisible by montage.num_clips={num_clips} (each pseudo-video is cut "
          f"into s clips of T/s frames).")
  if name == "synthetic":
    _validate_synthetic_params(config)
  if not check_paths:
    return
  if name == "tfrecord":
    pattern = _get(config, "data.train_pattern")
    if not isinstance(pattern, str) or not glob.glob(pattern):
      _fail("data.train_pattern", pattern,
            "matches no file; point it at existing TFRecord shards (make them with "
            "scripts/make_tfrecords.py) or "
            "use data.name='synthetic'.")
  elif name == "synthetic":
    directory = _get(config, "data.synthetic_dir")
    if not isinstance(directory, str) or not directory:
      _fail("data.synthetic_dir", directory, "must be a directory path.")
    if os.path.exists(directory) and not os.path.isdir(directory):
      _fail("data.synthetic_dir", directory, "exists and is not a directory.")
    parent = _nearest_existing_parent(directory)
    if not os.access(parent, os.W_OK) and not os.path.isdir(directory):
      _fail("data.synthetic_dir", directory,
            f"cannot be created: {parent} is not writable.")


def _validate_synthetic_params(config) -> None:
  """`data.synthetic_params` (optional) overrides fields of the generator's SyntheticParams."""
  overrides = config.data.get("synthetic_params", None)
  if not overrides:
    return
  from tcvm_jax.data import synthetic  # pylint: disable=g-import-not-at-top (NumPy only)
  fields = {f.name for f in dataclasses.fields(synthetic.SyntheticParams)}
  for key in overrides:
    if key not in fields:
      _fail(f"data.synthetic_params.{key}", overrides[key],
            f"unknown setting; choose from {sorted(fields)}.")
  try:
    synthetic.SyntheticParams(**dict(overrides)).validate()
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.data.synthetic_params: {error}") from None


def _nearest_existing_parent(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _validate_montage_and_augment(config) -> None:
  check_choice(config, "montage.variant", MONTAGE_VARIANTS)
  check_int(config, "montage.output_size", 8)
  if "group_devices" in config.montage:
    check_int(config, "montage.group_devices", 0)
  check_range_pair(config, "augment.crop_scale", 0.0, 1.0, low_open=True)
  check_range_pair(config, "augment.crop_ratio", 0.0, math.inf, low_open=True)
  check_range_pair(config, "augment.blur_sigma", 0.0, math.inf, low_open=True)
  for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
    check_number(config, f"augment.{name}", 0.0, 1.0)
  for name in ("brightness", "contrast", "saturation"):
    check_number(config, f"augment.{name}", 0.0)
  check_number(config, "augment.hue", 0.0, 0.5)
  for name in ("mean", "std"):
    value = tuple(_get(config, f"augment.{name}"))
    if len(value) != 3 or not all(_is_number(v) for v in value):
      _fail(f"augment.{name}", value, "needs three finite numbers (R, G, B).")
  if min(_get(config, "augment.std")) <= 0:
    _fail("augment.std", tuple(_get(config, "augment.std")), "every value must be > 0.")
  for name, choices in augment.COMPUTE_CHOICES.items():  # how it computes, not what
    if name in config.augment:
      check_choice(config, f"augment.{name}", choices)


def check_compute_switches(config) -> None:
  """model.stem_layout, model.stem_pool_gradient, model.block_relu_gradient,
  model.conv1x1_kernel, model.bn_fold, model.tsm_shift and state_layout, where the config
  has them (the pretraining and fine-tuning configs): how the backbone and the train step
  compute, not what."""
  if "state_layout" in config:
    check_choice(config, "state_layout", flat_state.STATE_LAYOUTS)
  if "stem_layout" in config.model:
    check_choice(config, "model.stem_layout", stem.STEM_LAYOUTS)
  if "stem_pool_gradient" in config.model:
    check_choice(config, "model.stem_pool_gradient", stem.POOL_GRADIENTS)
  if "block_relu_gradient" in config.model:
    check_choice(config, "model.block_relu_gradient", layers.BLOCK_RELU_GRADIENTS)
  if "conv1x1_kernel" in config.model:
    check_choice(config, "model.conv1x1_kernel", layers.CONV1X1_KERNELS)
  if "bn_fold" in config.model:
    check_choice(config, "model.bn_fold", layers.BN_FOLDS)
  if "tsm_shift" in config.model:
    check_choice(config, "model.tsm_shift", backbones.TSM_SHIFTS)


def _validate_model(config) -> None:
  check_choice(config, "model.backbone", BACKBONES)
  check_choice(config, "model.dtype", DTYPES)
  axis_name = _get(config, "model.bn_axis_name")
  if axis_name is not None and not isinstance(axis_name, str):
    _fail("model.bn_axis_name", axis_name, "must be None or a mesh axis name such as 'data'.")
  check_number(config, "model.bn_momentum", 0.0, 1.0, high_open=True)
  check_choice(config, "model.bn_gradient", layers.BATCH_NORM_GRADIENTS)
  check_choice(config, "model.bn_statistics", layers.BATCH_NORM_STATISTICS)
  check_compute_switches(config)
  check_number(config, "model.tc_k", 0.0, 1.0)
  check_bool(config, "model.tc_second_order")
  check_int(config, "model.tc_hidden_dim", 1, allowed=(-1,))
  check_int(config, "model.ofc_hidden_dim", 1)
  check_int(config, "model.ofc_dim", 1)


def _validate_loss(config) -> None:
  check_number(config, "loss.temperature", 0.0, low_open=True)
  alpha = check_number(config, "loss.alpha", 0.0)
  beta = check_number(config, "loss.beta", 0.0)
  if alpha == 0 and beta == 0:
    _fail("loss.alpha", alpha, "loss.alpha and loss.beta cannot both be 0 (nothing to learn).")
  check_choice(config, "loss.positive_reduction", POSITIVE_REDUCTIONS)


def _validate_optimization(config, num_devices: int | None, num_processes: int) -> None:
  batch_size = check_int(config, "batch_size", 1)
  if num_devices is not None and batch_size % num_devices:
    _fail("batch_size", batch_size,
          f"must be a multiple of the number of devices ({num_devices}): the batch is split "
          f"evenly over them.")
  if batch_size % num_processes:
    _fail("batch_size", batch_size,
          f"must be a multiple of the number of processes ({num_processes}).")
  num_clips = _get(config, "montage.num_clips")
  shuffled = _get(config, "montage.variant") != "C-A"
  group_devices = config.montage.get("group_devices", 0)
  if num_devices is not None and group_devices:
    if num_devices % group_devices:
      _fail("montage.group_devices", group_devices,
            f"must be 0 (all devices) or divide the number of devices ({num_devices}).")
    videos_per_group = batch_size * group_devices // num_devices
    if shuffled and videos_per_group < num_clips:
      _fail("montage.group_devices", group_devices,
            f"leaves {videos_per_group} videos per group, fewer than "
            f"montage.num_clips={num_clips}: a pseudo-video's clips would repeat a video. "
            f"Use larger groups or a larger batch.")
  if batch_size < num_clips and shuffled:
    _fail("batch_size", batch_size,
          f"must be >= montage.num_clips={num_clips} so that a pseudo-video's clips come "
          f"from different videos.")
  check_number(config, "base_learning_rate", 0.0, low_open=True)
  check_number(config, "momentum", 0.0, 1.0, high_open=True)
  check_number(config, "weight_decay", 0.0)
  check_choice(config, "schedule", SCHEDULES)
  decay_epochs = tuple(_get(config, "decay_epochs"))
  if (not all(_is_number(e) and e > 0 for e in decay_epochs)
      or list(decay_epochs) != sorted(decay_epochs)):
    _fail("decay_epochs", decay_epochs, "must be increasing positive epoch numbers.")
  check_number(config, "decay_factor", 0.0, 1.0, low_open=True)
  check_number(config, "warmup_epochs", 0.0)
  check_number(config, "num_epochs", 0.0, low_open=True)
  check_int(config, "num_train_steps", 1, allowed=(-1,))
  check_int(config, "seed", 0)


def _validate_bookkeeping(config) -> None:
  check_int(config, "log_every_steps", 1)
  check_int(config, "checkpoint_every_steps", 1)
  check_int(config, "keep_checkpoints", 1)
  if "preset" in config:
    check_choice(config, "preset", PRESETS)
  if config.get("eval_retrieval", ""):
    check_choice(config, "eval_retrieval", RETRIEVAL_PRESETS + ("none",))


def _validate_model_builds(config) -> None:
  """Builds the model abstractly (no parameters allocated): catches combinations such as
  backbone width C not divisible by the clip length T/s, before any data or compilation."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tcvm_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  try:
    nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  except ValueError as error:
    raise ConfigError(f"The model cannot be built from this config: {error}") from None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int = 1, check_paths: bool = True,
                    check_model: bool = True) -> None:
  """Raises ConfigError naming the first field outside its allowed range.

  num_devices: the global device count, when known (batch divisibility).
  check_paths: whether input paths must exist (off for unit tests of other fields).
  check_model: also build the model abstractly (about a second for R3D50).
  """
  _validate_data(config, check_paths)
  _validate_montage_and_augment(config)
  _validate_model(config)
  _validate_loss(config)
  _validate_optimization(config, num_devices, num_processes)
  _validate_bookkeeping(config)
  if check_model:
    _validate_model_builds(config)
