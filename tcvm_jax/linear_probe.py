r"""Linear probe: a linear classifier trained on frozen encoder features.

  python -m tcvm_jax.main --config=configs/linear_probe.py:ucf101 \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=DIR

Features are those of retrieval (backbone output mean-pooled, averaged over each video's
clips), extracted once per split; they are standardised with the train split's mean and
standard deviation, and a softmax regression is trained on device with AdamW and a cosine
schedule (a convex problem: cheap and insensitive to its settings). For a linear model,
the mean of the views' logits equals the logits of the mean feature, so testing on
averaged features is multi-view testing.

The probe needs one forward pass per clip and no backpropagation through the encoder,
which makes it cheap enough to monitor pretraining: `probe_train_state` runs it on the
backbone of a pretraining train state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from tcvm_jax import checkpointing
from tcvm_jax import config_validation as cv
from tcvm_jax import finetune
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import retrieval


@dataclasses.dataclass
class LinearClassifier:
  """logits = (features - mean) / std @ kernel + bias, all float32 NumPy."""

  kernel: np.ndarray   # (C, K)
  bias: np.ndarray     # (K,)
  mean: np.ndarray     # (C,) train-split feature mean
  std: np.ndarray      # (C,) train-split feature std (floored)

  def logits(self, features: np.ndarray) -> np.ndarray:
    return ((np.asarray(features, np.float32) - self.mean) / self.std) @ self.kernel + self.bias


def standardization(features: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std (std floored at `eps`, so constant features stay finite)."""
  features = np.asarray(features, np.float64)
  return (features.mean(axis=0).astype(np.float32),
          np.maximum(features.std(axis=0), eps).astype(np.float32))


@functools.partial(jax.jit, static_argnames=("num_classes", "num_epochs", "batch_size"))
def _fit_softmax_regression(features: jax.Array, labels: jax.Array, key: jax.Array, *,
                            num_classes: int, num_epochs: int, batch_size: int,
                            learning_rate: float, weight_decay: float
                            ) -> tuple[dict[str, jax.Array], jax.Array]:
  """Minibatch AdamW on mean cross-entropy; returns params and the per-epoch mean loss."""
  num_examples, num_features = features.shape
  steps_per_epoch = num_examples // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate, num_epochs * steps_per_epoch)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  params = {"kernel": jnp.zeros((num_features, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(params, batch_features, batch_labels):
    logits = batch_features @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

  def step(carry, indices):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, features[indices], labels[indices])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def epoch(carry, epoch_key):
    order = jax.random.permutation(epoch_key, num_examples)
    batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    carry, losses = jax.lax.scan(step, carry, batches)
    return carry, losses.mean()

  (params, _), epoch_losses = jax.lax.scan(epoch, (params, optimizer.init(params)),
                                           jax.random.split(key, num_epochs))
  return params, epoch_losses


def train_linear_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                            num_epochs: int = 100, batch_size: int = 256,
                            learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                            seed: int = 0) -> tuple[LinearClassifier, np.ndarray]:
  """Softmax regression on standardised `features` (N, C); returns it and epoch losses."""
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f"features (N, C) and labels (N,) expected; got {features.shape} and "
                     f"{labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"Labels must lie in [0, {num_classes}) (num_classes); got range "
                     f"[{labels.min()}, {labels.max()}] (-1: unlabelled records).")
  mean, std = standardization(features)
  batch_size = min(batch_size, features.shape[0])
  params, losses = _fit_softmax_regression(
      jnp.asarray((features - mean) / std), jnp.asarray(labels), jax.random.key(seed),
      num_classes=num_classes, num_epochs=num_epochs, batch_size=batch_size,
      learning_rate=learning_rate, weight_decay=weight_decay)
  params = jax.device_get(params)
  classifier = LinearClassifier(np.asarray(params["kernel"]), np.asarray(params["bias"]),
                                mean, std)
  return classifier, np.asarray(losses)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first probe setting outside its allowed range."""
  retrieval.validate_data_config(config)
  cv.check_int(config, "num_classes", 2, allowed=(-1,))
  cv.check_int(config, "probe.train_clips", 1)
  cv.check_int(config, "probe.test_clips", 1)
  cv.check_choice(config, "probe.num_crops", (1, 3))
  cv.check_int(config, "probe.num_epochs", 1)
  cv.check_int(config, "probe.batch_size", 1)
  cv.check_number(config, "probe.learning_rate", 0.0, low_open=True)
  cv.check_number(config, "probe.weight_decay", 0.0)
  if not config.init_checkpoint:
    raise cv.ConfigError(
        "config.init_checkpoint is empty: pass --config.init_checkpoint=PRETRAIN_WORKDIR "
        "(or its encoder/ export), or 'random' for a random-init baseline.")


def evaluate(config: ml_collections.ConfigDict, source: retrieval.EncoderSource,
             mesh: Mesh) -> tuple[dict[str, Any], LinearClassifier]:
  """Extracts features, fits the probe; ({'top1', 'top5', 'train_top1', ...}, probe)."""
  probe = config.probe
  if probe.train_split == probe.test_split:
    raise cv.ConfigError(f"config.probe.test_split={probe.test_split!r} equals "
                         f"probe.train_split: test on held-out videos.")
  features = retrieval.extract_video_features(
      config, source, {probe.train_split: (probe.train_clips, 1),
                       probe.test_split: (probe.test_clips, probe.num_crops)}, mesh=mesh)
  train_outputs, test_outputs = features[probe.train_split], features[probe.test_split]
  num_classes = finetune.num_classes_for(config)
  started = time.time()
  classifier, losses = train_linear_classifier(
      train_outputs.values, train_outputs.labels, num_classes, num_epochs=probe.num_epochs,
      batch_size=probe.batch_size, learning_rate=probe.learning_rate,
      weight_decay=probe.weight_decay, seed=config.seed)
  logging.info("Linear probe trained in %.1fs (final epoch loss %.4f).", time.time() - started,
               float(losses[-1]))
  test_accuracy = finetune.classification_accuracy(classifier.logits(test_outputs.values),
                                                   test_outputs.labels)
  train_accuracy = finetune.classification_accuracy(classifier.logits(train_outputs.values),
                                                    train_outputs.labels, ks=(1,))
  results = {**test_accuracy, "train_top1": train_accuracy["top1"],
             "final_train_loss": float(losses[-1]), "num_classes": num_classes,
             "num_train_videos": int(train_outputs.video_index.size),
             "num_test_videos": int(test_outputs.video_index.size)}
  return results, classifier


def source_from_train_state(pretrain_config: ml_collections.ConfigDict, params: Any,
                            batch_stats: Any, description: str = "pretraining state"
                            ) -> retrieval.EncoderSource:
  """An EncoderSource for the backbone of a TCVM train state's params / batch_stats (nested
  dicts, as `train_step.TrainState` holds them, or nnx.States).

  Lets the pretraining loop probe its current encoder without exporting it first.
  """
  flat = lambda state: checkpointing.nest(  # noqa: E731
      checkpointing.flatten_by_path(jax.device_get(state["backbone"])))
  encoder = checkpointing.EncoderCheckpoint(config=pretrain_config, params=flat(params),
                                            batch_stats=flat(batch_stats))
  return retrieval.EncoderSource(pretrain_config.model.backbone,
                                 tuple(pretrain_config.augment.mean),
                                 tuple(pretrain_config.augment.std), encoder, description)


def probe_train_state(probe_config: ml_collections.ConfigDict,
                      pretrain_config: ml_collections.ConfigDict, params: Any,
                      batch_stats: Any) -> dict[str, Any]:
  """Linear-probe accuracy of a pretraining state's encoder (for monitoring)."""
  source = source_from_train_state(pretrain_config, params, batch_stats)
  results, _ = evaluate(probe_config, source, mesh_lib.create_mesh())
  return results


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Probes config.init_checkpoint; writes WORKDIR/results.json (process 0)."""
  from tcvm_jax import train  # pylint: disable=import-outside-toplevel (results writer)
  validate_config(config)
  workdir = os.path.abspath(workdir or config.workdir)
  mesh = mesh_lib.create_mesh()
  retrieval.per_process_batch_size(config.batch_size, mesh)
  source = retrieval.resolve_encoder(config, config.init_checkpoint)
  results, _ = evaluate(config, source, mesh)
  probe = config.probe
  results["protocol"] = {
      "task": "linear_probe", "dataset": config.get("dataset", config.data.name),
      "encoder": source.description, "backbone": source.backbone,
      "train_split": probe.train_split, "test_split": probe.test_split,
      "train_clips": probe.train_clips, "test_views": f"{probe.test_clips}x{probe.num_crops}",
      "num_frames": config.data.num_frames, "frame_stride": config.data.frame_stride,
      "frame_size": config.eval.output_size,
      "features": "frozen backbone output mean-pooled, averaged over views, standardised "
                  "with train-split statistics",
      "classifier": f"softmax regression, AdamW lr {probe.learning_rate} (cosine), "
                    f"weight decay {probe.weight_decay}, {probe.num_epochs} epochs"}
  logging.info("Linear probe (%s): top-1 %.2f%%, top-5 %.2f%% on %d test videos (train "
               "top-1 %.2f%%).", source.description, 100 * results["top1"],
               100 * results["top5"], results["num_test_videos"], 100 * results["train_top1"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    train.write_results(workdir, results, config)
  return results
