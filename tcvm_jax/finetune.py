r"""Supervised fine-tuning of a pretrained backbone and multi-view testing (paper Table 1).

  python -m tcvm_jax.main --config=configs/finetune_ssv2.py \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=DIR

The classifier is the backbone, global average pooling, dropout and one linear layer.
The backbone starts from the pretraining export (`checkpointing.load_encoder`); the TC
and OFC heads are not part of it and the linear classifier starts fresh (paper Sec. 4.1,
following [47]). Training: SGD with momentum, lr `base_learning_rate` (0.005 for a batch
of 32, scaled linearly like pretraining), random resized crops (+ flips where the labels
allow) to `augment.output_size`, on device.

Testing (paper Sec. 4.2): for each (clips, crops) setting in `eval.views`, every video
is seen as `clips` uniformly spaced clips x `crops` spatial crops; softmax scores are
averaged over the views and top-1/top-5 computed per video. The default views follow
the backbone: R3D 10x3 (SlowFast), TSM 2x3 (TSM), each with the 1-view test (centre clip,
centre crop) as well.

Checkpoints, logging, resume, preemption and sharding are the pretraining loop's:
WORKDIR/checkpoints/<step> (orbax), TensorBoard `train/...` and `eval/...`,
WORKDIR/results.json.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from tcvm_jax import augment
from tcvm_jax import checkpointing
from tcvm_jax import config_validation as cv
from tcvm_jax import flat_state
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import metrics as metrics_lib
from tcvm_jax import optim
from tcvm_jax import retrieval
from tcvm_jax import xla_options

TrainState = dict[str, Any]
LABEL_MAP_FILENAME = "label_map.txt"
# Multi-view test protocols by backbone family: (temporal clips, spatial crops).
VIEWS_BY_FAMILY = {"r3d": ((1, 1), (10, 3)), "tsm": ((1, 1), (2, 3))}
_FINITE_METRICS = ("loss", "grad_norm", "param_norm")


# --- The model ----------------------------------------------------------------------------


def make_classifier_head(num_features: int, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """SlowFast's head init: N(0, 0.01) weights, zero bias."""
  return nnx.Linear(num_features, num_classes, kernel_init=nnx.initializers.normal(0.01),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class VideoClassifier(nnx.Module):
  """backbone -> mean over (T, h, w) -> dropout -> linear `classifier` -> float32 logits."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, dropout_rate: float = 0.5,
               rngs: nnx.Rngs):
    if num_classes < 2:
      raise ValueError(f"num_classes={num_classes}: need at least 2 classes.")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate={dropout_rate}: must lie in [0, 1).")
    self.backbone = backbone
    self.dropout_rate = dropout_rate
    self.classifier = make_classifier_head(backbone.num_features, num_classes, rngs=rngs)

  def __call__(self, videos: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """videos (B, T, H, W, 3) normalised -> logits (B, num_classes) float32.

    Dropout is applied only when `dropout_key` is given (training).
    """
    features = retrieval.pooled_features(self.backbone, videos)  # (B, C) float32
    if dropout_key is not None and self.dropout_rate > 0:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout_rate, features.shape)
      features = jnp.where(keep, features / (1.0 - self.dropout_rate), 0.0)
    return self.classifier(features).astype(jnp.float32)


def create_classifier_fn(source: retrieval.EncoderSource, config: ml_collections.ConfigDict,
                         num_classes: int, *, seed: int) -> Callable[[], VideoClassifier]:
  create_backbone = retrieval.create_backbone_fn(source, config.model, seed=seed)
  dropout_rate = config.model.dropout_rate

  def create():
    return VideoClassifier(create_backbone(), num_classes, dropout_rate=dropout_rate,
                           rngs=_head_rngs(seed))

  return create


def init_classifier(source: retrieval.EncoderSource, config: ml_collections.ConfigDict,
                    num_classes: int, *, seed: int
                    ) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
  """(train graphdef, eval graphdef, params, batch_stats) with the pretrained backbone.

  Every backbone parameter and BatchNorm statistic comes from `source.checkpoint` (when
  set); the classifier keeps its fresh initialisation.
  """
  create = create_classifier_fn(source, config, num_classes, seed=seed)
  abstract = nnx.eval_shape(create)
  abstract.eval()
  eval_graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  if source.checkpoint is None:
    train_graphdef, params, batch_stats = retrieval.init_module_state(create, eval_mode=False)
    return train_graphdef, eval_graphdef, params, batch_stats
  # Pretrained: the backbone comes from the checkpoint, so initialise only the head (the
  # same draws as inside `create`: the head is the first user of its Rngs).
  abstract.train()
  train_graphdef, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  if set(batch_stats.keys()) - {"backbone"}:
    raise ValueError(f"Unexpected BatchNorm state outside the backbone: {set(batch_stats)}.")
  params["backbone"], batch_stats["backbone"] = retrieval.load_backbone_weights(
      params["backbone"], batch_stats["backbone"], source.checkpoint)
  head = make_classifier_head(abstract.backbone.num_features, num_classes,
                              rngs=_head_rngs(seed))
  params["classifier"] = nnx.state(head, nnx.Param)
  return train_graphdef, eval_graphdef, params, batch_stats


def _head_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(seed + 1)


# --- Augmentation, loss, steps --------------------------------------------------------------


def augment_videos(key: jax.Array, videos: jax.Array, aug_config: ml_collections.ConfigDict,
                   out_size: int, mean: Sequence[float], std: Sequence[float],
                   dtype: Any = jnp.float32) -> jax.Array:
  """uint8 (B, T, S, S, 3) -> (B, T, out, out, 3): per-video random resized crop + flip."""
  in_hw = videos.shape[2:4]

  def one(video_key, video):
    crop_key, flip_key = jax.random.split(video_key)
    box = augment.sample_crop_box(crop_key, in_hw, aug_config.crop_scale, aug_config.crop_ratio)
    flip = jax.random.uniform(flip_key) < aug_config.flip_prob
    frames = augment.crop_resize_flip(video, box, flip, out_size)  # [0, 1]
    return augment.normalize(frames, mean, std).astype(dtype)

  return jax.vmap(one)(jax.random.split(key, videos.shape[0]), videos)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (optionally smoothed)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def create_train_state(params: nnx.State, batch_stats: nnx.State,
                       optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int) -> TrainState:
  """The pretraining state layout (step, params, batch_stats, opt_state, rng), replicated."""
  # Plain dicts: a jitted call flattens them in C++ (tcvm_jax/train_step.py's TrainState).
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
           "opt_state": optimizer.init(params), "rng": jax.random.key(seed)}
  return jax.device_put(state, mesh_lib.replicated_sharding(mesh))


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mean: Sequence[float], std: Sequence[float],
                    form: flat_state.StateForm = flat_state.TreeForm()
                    ) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """(state, uint8 videos (B, T, S, S, 3), int labels (B,)) -> (state, metrics), the
  state carried in `form` as the pretraining step carries it (`train_step.py`; a flat
  one is updated flat, `flat_state.FlatForm`)."""
  dtype = jnp.dtype(config.model.dtype)
  out_size = config.augment.output_size
  label_smoothing = config.label_smoothing

  def train_step(state, videos, labels):
    step_key = jax.random.fold_in(state["rng"], state["step"])
    augment_key, dropout_key = jax.random.split(step_key)
    clips = augment_videos(augment_key, videos, config.augment, out_size, mean, std, dtype)

    batch_stats_tree = form.batch_stats_tree(state["batch_stats"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params, batch_stats_tree, copy=True)
      logits = model(clips, dropout_key=dropout_key)
      loss = cross_entropy(logits, labels, label_smoothing)
      return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        form.params_tree(state["params"]))
    grads = form.params_carried(grads)
    batch_stats = form.batch_stats_carried(batch_stats)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "learning_rate": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    return {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
            "opt_state": opt_state, "rng": state["rng"]}, metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh, compiler_options: dict[str, Any] | None = None):
  replicated = mesh_lib.replicated_sharding(mesh)
  sharded = mesh_lib.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler_options)


def make_score_fn(graphdef: nnx.GraphDef, *, out_size: int, mean: Sequence[float],
                  std: Sequence[float], dtype: Any,
                  form: flat_state.StateForm = flat_state.TreeForm()
                  ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """(state in `form`, uint8 views (B, T, S, S, 3)) -> softmax scores (B, K); eval-mode
  BatchNorm."""

  def scores(state, videos):
    model = nnx.merge(graphdef, form.params_tree(state["params"]),
                      form.batch_stats_tree(state["batch_stats"]))
    clips = retrieval.preprocess_views(videos, out_size, mean, std, dtype)
    return jax.nn.softmax(model(clips), axis=-1)

  return scores


# --- Multi-view testing ----------------------------------------------------------------------


def views_for(config: ml_collections.ConfigDict, backbone: str) -> tuple[tuple[int, int], ...]:
  """config.eval.views, or the backbone family's protocol when it is empty."""
  views = tuple(tuple(int(n) for n in view) for view in config.eval.views)
  if views:
    return views
  family = "tsm" if backbone.startswith("tsm") else "r3d"
  return VIEWS_BY_FAMILY[family]


def view_name(num_clips: int, num_crops: int) -> str:
  return f"{num_clips}x{num_crops}"


def classification_accuracy(scores: np.ndarray, labels: np.ndarray,
                            ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """{'top{k}': share of rows whose label is among the k highest scores} (k capped at K).

  Ties are broken towards the lower class index (a stable sort).
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if labels.min(initial=0) < 0 or labels.max(initial=0) >= scores.shape[1]:
    raise ValueError(f"Labels must lie in [0, {scores.shape[1]}); got range "
                     f"[{labels.min()}, {labels.max()}].")
  ranking = np.argsort(-scores, axis=1, kind="stable")
  hits = ranking == labels[:, None]
  return {f"top{k}": float(hits[:, :min(k, scores.shape[1])].any(axis=1).mean()) for k in ks}


def multi_view_accuracy(runner: Callable, state: Any,
                        batches: Iterable[Mapping[str, np.ndarray]], *, num_views: int,
                        description: str = "test") -> dict[str, Any]:
  """Averages each video's scores over exactly `num_views` views; top-1/top-5 per video."""
  outputs = retrieval.average_over_views(runner, state, batches, expected_views=num_views,
                                         description=description)
  return {**classification_accuracy(outputs.values, outputs.labels),
          "num_videos": int(outputs.video_index.size), "num_views": num_views}


def evaluate_views(config: ml_collections.ConfigDict, runner: Callable, state: Any,
                   mesh: Mesh, split: str, views: Sequence[tuple[int, int]]
                   ) -> dict[str, dict[str, Any]]:
  """{'10x3': {'top1', 'top5', 'num_videos', 'num_views'}, ...} on `split`."""
  from tcvm_jax.data import pipeline  # pylint: disable=import-outside-toplevel (TensorFlow)
  batch_per_process = retrieval.per_process_batch_size(config.eval.batch_size, mesh)
  results = {}
  for num_clips, num_crops in views:
    batches = pipeline.make_eval_dataset(
        config, split, batch_size_per_process=batch_per_process, num_clips=num_clips,
        num_crops=num_crops, process_index=jax.process_index(),
        process_count=jax.process_count())
    name = view_name(num_clips, num_crops)
    results[name] = multi_view_accuracy(runner, state, batches,
                                        num_views=num_clips * num_crops,
                                        description=f"{split} {name} views")
    logging.info("%s %s views: top-1 %.2f%%, top-5 %.2f%% over %d videos.", split, name,
                 100 * results[name]["top1"], 100 * results[name]["top5"],
                 results[name]["num_videos"])
  return results


# --- Config --------------------------------------------------------------------------------


def num_classes_for(config: ml_collections.ConfigDict) -> int:
  """config.num_classes, or the lines of label_map.txt beside the training shards (-1)."""
  if config.num_classes > 0:
    return config.num_classes
  from tcvm_jax.data import pipeline  # pylint: disable=import-outside-toplevel (TensorFlow)
  directory = os.path.dirname(pipeline.split_pattern(config, "train"))
  path = os.path.join(directory, LABEL_MAP_FILENAME)
  if not os.path.isfile(path):
    raise cv.ConfigError(f"config.num_classes=-1 reads {path}, which does not exist; set "
                         f"config.num_classes to the number of classes.")
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  return len(names)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first fine-tuning setting outside its allowed range."""
  retrieval.validate_data_config(config)
  cv.check_int(config, "num_classes", 2, allowed=(-1,))
  cv.check_int(config, "augment.output_size", 8)
  cv.check_range_pair(config, "augment.crop_scale", 0.0, 1.0, low_open=True)
  cv.check_range_pair(config, "augment.crop_ratio", 0.0, math.inf, low_open=True)
  cv.check_number(config, "augment.flip_prob", 0.0, 1.0)
  cv.check_number(config, "model.dropout_rate", 0.0, 1.0, high_open=True)
  cv.check_number(config, "model.bn_momentum", 0.0, 1.0, high_open=True)
  cv.check_compute_switches(config)
  cv.check_number(config, "label_smoothing", 0.0, 1.0, high_open=True)
  cv.check_number(config, "base_learning_rate", 0.0, low_open=True)
  cv.check_number(config, "momentum", 0.0, 1.0, high_open=True)
  cv.check_number(config, "weight_decay", 0.0)
  cv.check_choice(config, "schedule", optim.SCHEDULES)
  cv.check_number(config, "decay_factor", 0.0, 1.0, low_open=True)
  cv.check_number(config, "warmup_epochs", 0.0)
  cv.check_number(config, "num_epochs", 0.0, low_open=True)
  cv.check_int(config, "num_train_steps", 1, allowed=(-1,))
  cv.check_int(config, "data.shuffle_buffer", 1)
  cv.check_int(config, "eval.batch_size", 1)
  cv.check_int(config, "eval_every_steps", 1, allowed=(-1,))
  cv.check_int(config, "log_every_steps", 1)
  cv.check_int(config, "checkpoint_every_steps", 1)
  cv.check_int(config, "keep_checkpoints", 1)
  for view in config.eval.views:
    view = tuple(view)
    if (len(view) != 2 or not all(isinstance(n, int) and n >= 1 for n in view)
        or view[1] not in (1, 3)):
      raise cv.ConfigError(f"config.eval.views contains {view!r}: each view setting is "
                           f"(clips >= 1, crops in (1, 3)).")
  if not config.init_checkpoint:
    raise cv.ConfigError(
        "config.init_checkpoint is empty: pass --config.init_checkpoint=PRETRAIN_WORKDIR "
        "(or its encoder/ export), or 'random' to fine-tune from scratch.")


# --- The loop --------------------------------------------------------------------------------


def _host_labels(batch: Mapping[str, np.ndarray], num_classes: int) -> np.ndarray:
  """The batch's labels as int32, checked to lie in [0, num_classes)."""
  labels = np.asarray(batch["label"], np.int32)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ValueError(
        f"Training labels must lie in [0, {num_classes}) (config.num_classes); got "
        f"{sorted(set(labels[bad].tolist()))[:5]} (-1: an unlabelled record). Check the "
        f"TFRecords' label_map.txt or config.num_classes.")
  return labels


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Fine-tunes (resuming from WORKDIR's checkpoints), then tests; returns the results.

  Results: 'views' {'1x1': {...}, '10x3': {...}}, top-level 'top1'/'top5' of the last
  (largest) view setting, the final train metrics, 'history' and the 'protocol'.
  """
  from tcvm_jax import train  # pylint: disable=import-outside-toplevel (loop helpers)
  from tcvm_jax.data import pipeline  # pylint: disable=import-outside-toplevel (TensorFlow)
  started = time.time()
  validate_config(config)
  workdir = os.path.abspath(workdir or config.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh()
  batch_per_process = retrieval.per_process_batch_size(config.batch_size, mesh)
  is_primary = jax.process_index() == 0
  writer = metrics_lib.create_writer(workdir, is_primary=is_primary)

  source = retrieval.resolve_encoder(config, config.init_checkpoint)
  num_classes = num_classes_for(config)
  views = views_for(config, source.backbone)
  num_videos = pipeline.num_train_records(config)
  steps_per_epoch, num_train_steps = train.num_train_steps_for(config, num_videos)
  logging.info("Fine-tuning %s (%s) on %d videos, %d classes: %d steps (%d per epoch).",
               source.backbone, source.description, num_videos, num_classes, num_train_steps,
               steps_per_epoch)
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch, num_train_steps)
  graphdef, eval_graphdef, params, batch_stats = init_classifier(
      source, config, num_classes, seed=config.seed)
  state = create_train_state(params, batch_stats, optimizer, mesh, seed=config.seed)

  checkpointer = checkpointing.Checkpointer(
      checkpointing.checkpoints_directory(workdir), every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints)
  batches_consumed = 0
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state, data_position = checkpointer.restore(state, resumed_from)
    if data_position.get("global_batch_size", config.batch_size) != config.batch_size:
      raise cv.ConfigError(
          f"config.batch_size={config.batch_size}: the checkpoint in "
          f"{checkpointer.directory} was written with batch_size="
          f"{data_position['global_batch_size']}; resume with that value or use a fresh "
          f"--workdir.")
    batches_consumed = int(data_position["batches_consumed"])
    logging.info("Resumed from step %d (init_checkpoint not reloaded).", resumed_from)
  step = int(jax.device_get(state["step"]))

  dtype = jnp.dtype(config.model.dtype)
  options = xla_options.for_mesh(source.backbone, mesh)
  # As the pretraining loop: the state carried flat (config.state_layout), the tree
  # rebuilt only to save it.
  form = flat_state.form_for(config, state)
  replicated = mesh_lib.replicated_sharding(mesh)
  to_tree = form.jit_to_tree(replicated)
  state = form.jit_to_carried(replicated)(state)
  step_fn = jit_train_step(make_train_step(config, graphdef, optimizer, schedule,
                                           mean=source.mean, std=source.std, form=form),
                           mesh, options)
  runner = retrieval.make_view_runner(
      make_score_fn(eval_graphdef, out_size=config.eval.output_size, mean=source.mean,
                    std=source.std, dtype=dtype, form=form), mesh, options)
  batches = pipeline.make_train_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      batch_size_per_process=batch_per_process, seed=config.seed,
      start_step=batches_consumed)
  throughput = metrics_lib.Throughput(start_step=step, num_train_steps=num_train_steps,
                                      clips_per_step=config.batch_size)
  accumulator = metrics_lib.MeanAccumulator()
  history: list[dict[str, float]] = []
  last_metrics: dict[str, float] = {}
  preemption = train.PreemptionWatcher()
  preempted = False

  pending: list[tuple[int, dict[str, jax.Array]]] = []  # steps whose metrics are unread

  def read_pending() -> None:
    """Fetches the queued steps' metrics (a sync point) and stops on non-finite ones."""
    nonlocal last_metrics
    for metrics_step, device_metrics in pending:
      host_metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      bad = {k: host_metrics[k] for k in _FINITE_METRICS
             if not math.isfinite(host_metrics[k])}
      if bad:
        checkpointer.wait()
        raise train.NonFiniteLossError(
            f"Non-finite fine-tuning metrics at step {metrics_step} ({bad}); the last "
            f"checkpoint ({checkpointer.latest_step()}) is intact. Lower "
            f"config.base_learning_rate.")
      accumulator.add(host_metrics)
      last_metrics = host_metrics
    pending.clear()

  first_step, loop_started = step, time.time()
  try:
    while step < num_train_steps:
      host_batch = next(batches)
      labels = _host_labels(host_batch, num_classes)
      videos, labels = mesh_lib.host_batch_to_global((host_batch["video"], labels), mesh)
      state, device_metrics = step_fn(state, videos, labels)
      batches_consumed += 1
      step += 1
      pending.append((step, device_metrics))
      if step == first_step + 1:
        jax.block_until_ready(device_metrics)
        logging.info("First step done in %.1fs (compilation included).",
                     time.time() - loop_started)
        throughput.restart(step)  # speed and ETA without the compilation
      is_last = step == num_train_steps
      preempted = preemption.reached(step)
      must_log = step % config.log_every_steps == 0 or is_last
      must_save = preempted or is_last or checkpointer.should_save(step)
      if must_log or must_save:
        read_pending()  # never save a non-finite state
      if must_log and len(accumulator):
        means = accumulator.pop_means()
        speed = throughput.measure(step)
        writer.write_scalars(step, metrics_lib.train_scalars(means, speed))
        logging.info("finetune step %d/%d | loss %.4f | acc %.3f | lr %.4g | %.1f clips/s | "
                     "ETA %s", step, num_train_steps, means["loss"], means["accuracy"],
                     means["learning_rate"], speed["clips_per_sec"],
                     metrics_lib.format_duration(speed["eta_seconds"]))
        history.append({"step": step, **means})
      if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and not is_last:
        quick = evaluate_views(config, runner, state, mesh, config.eval.split, views[:1])
        name = view_name(*views[0])
        writer.write_scalars(step, {f"eval/top1_{name}": quick[name]["top1"],
                                    f"eval/top5_{name}": quick[name]["top5"]})
        throughput.restart(step)
      if must_save:
        checkpointer.save(step, to_tree(state), {"batches_consumed": batches_consumed,
                                                 "global_batch_size": config.batch_size,
                                                 "seed": config.seed},
                          force=preempted or is_last)
      if preempted:
        logging.warning("Preempted: saved the checkpoint at step %d; exiting.", step)
        break
    read_pending()
    checkpointer.wait()
  finally:
    preemption.close()
    checkpointer.close()

  results: dict[str, Any] = {"step": step, "num_train_steps": num_train_steps,
                             "preempted": preempted, "resumed_from_step": resumed_from,
                             "train": last_metrics, "history": history}
  if not preempted:
    view_results = evaluate_views(config, runner, state, mesh, config.eval.split, views)
    writer.write_scalars(step, {f"eval/{metric}_{name}": value[metric]
                                for name, value in view_results.items()
                                for metric in ("top1", "top5")})
    main_view = view_name(*views[-1])
    results.update({"top1": view_results[main_view]["top1"],
                    "top5": view_results[main_view]["top5"], "main_view": main_view,
                    "views": view_results})
  writer.flush()
  results["protocol"] = {
      "task": "finetune", "dataset": config.get("dataset", config.data.name),
      "init": source.description, "backbone": source.backbone, "num_classes": num_classes,
      "train_frames": config.data.num_frames, "frame_stride": config.data.frame_stride,
      "sampler": config.data.sampler, "train_size": config.augment.output_size,
      "test_size": config.eval.output_size, "test_split": config.eval.split,
      "views": [view_name(*view) for view in views],
      "score_averaging": "softmax scores averaged over views",
      "peak_learning_rate": optim.peak_learning_rate(config)}
  results["wall_time_seconds"] = time.time() - started
  if is_primary and not preempted:
    train.write_results(workdir, results, config)
  return results
