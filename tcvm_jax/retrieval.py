r"""Video retrieval with a frozen encoder: the protocol of Tables 2a/2b (paper Sec. 4.1).

Every video of the query split (test) searches the gallery split (train) by cosine
similarity of encoder features; a query is correct at k if any of its k nearest gallery
videos shares its class. Features are the backbone's output mean-pooled over time and
space, averaged over `retrieval.num_clips` uniformly spaced clips (x `num_crops` crops)
of each video, then L2-normalised.

  python -m tcvm_jax.main --config=configs/retrieval.py:ucf101 \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=DIR

writes DIR/results.json ({'top1', 'top5', 'top10', 'protocol', 'rows', ...}) and
DIR/results.md (a table; one row per encoder, plus a random-init row with
--config.random_baseline=True).

Similarities are computed on device, a gallery block at a time with a running top-k,
so memory is O(query block x gallery block) whatever the gallery size; query blocks are
sharded over the mesh's `data` axis. This module also holds the pieces the other
downstream tasks share: resolving and building the encoder, and running a function over
every view of a split with per-video averaging.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from tcvm_jax import augment
from tcvm_jax import backbones
from tcvm_jax import checkpointing
from tcvm_jax import config_validation as cv
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import xla_options

RANDOM_INIT = "random"       # init_checkpoint value: a randomly initialised encoder.
AUTO_BACKBONE = "auto"       # model.backbone value: the checkpoint's architecture.
TABLE_FILENAME = "results.md"
DATA_NAMES = ("tfrecord", "synthetic")
DTYPES = ("float32", "bfloat16")
_UINT32 = 2**32


# --- The encoder ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderSource:
  """Which backbone to build, with which weights and input normalisation.

  checkpoint None means random initialisation (seeded by the caller).
  """

  backbone: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  checkpoint: checkpointing.EncoderCheckpoint | None
  description: str

  def random_like(self) -> EncoderSource:
    """The same architecture and normalisation, randomly initialised (the baseline)."""
    return dataclasses.replace(self, checkpoint=None, description=RANDOM_INIT)


def resolve_encoder(config: ml_collections.ConfigDict, init_checkpoint: str) -> EncoderSource:
  """`init_checkpoint` (a pretraining WORKDIR, its `encoder/` export, or 'random') -> source.

  With a checkpoint, the architecture and input normalisation are the pretraining run's;
  config.model.backbone must be 'auto' or the same name. With 'random', the backbone is
  config.model.backbone and the normalisation config.augment.mean/std.
  """
  requested = config.model.backbone
  if init_checkpoint == RANDOM_INIT:
    if requested == AUTO_BACKBONE:
      raise cv.ConfigError(
          f"config.model.backbone={requested!r}: with init_checkpoint='random' name the "
          f"architecture, one of {tuple(backbones.BACKBONES)}.")
    if requested not in backbones.BACKBONES:
      raise cv.ConfigError(f"config.model.backbone={requested!r}: choose one of "
                           f"{tuple(backbones.BACKBONES)} or 'auto'.")
    return EncoderSource(requested, tuple(config.augment.mean), tuple(config.augment.std),
                         None, RANDOM_INIT)
  if not init_checkpoint:
    raise cv.ConfigError(
        "config.init_checkpoint is empty: set it to a pretraining WORKDIR (or its encoder/ "
        "export), or to 'random' for a randomly initialised encoder.")
  encoder = checkpointing.load_encoder(init_checkpoint)
  pretrain_config = encoder.config
  name = pretrain_config.model.backbone
  if requested not in (AUTO_BACKBONE, name):
    raise cv.ConfigError(
        f"config.model.backbone={requested!r}, but {init_checkpoint} holds a {name!r} "
        f"encoder; set it to 'auto' or {name!r}.")
  augment_config = pretrain_config.get("augment", None) or config.augment
  return EncoderSource(name, tuple(augment_config.mean), tuple(augment_config.std), encoder,
                       os.path.abspath(init_checkpoint))


def init_module_state(create: Callable[[], nnx.Module], *, eval_mode: bool
                      ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, batch_stats) of `create()`, initialised under jit.

  Eager initialisation compiles one small program per parameter; one jitted init is
  much faster. `eval_mode` sets BatchNorm to use its running statistics.
  """
  abstract = nnx.eval_shape(create)
  if eval_mode:
    abstract.eval()
  else:
    abstract.train()
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  params, batch_stats = jax.jit(lambda: nnx.split(create(), nnx.Param, nnx.BatchStat)[1:])()
  return graphdef, params, batch_stats


def load_backbone_weights(params: nnx.State, batch_stats: nnx.State,
                          encoder: checkpointing.EncoderCheckpoint
                          ) -> tuple[nnx.State, nnx.State]:
  """A backbone's (params, batch_stats) states with every leaf taken from `encoder`.

  Fails (naming the entry) when the export misses a leaf or has another shape.
  """
  params = checkpointing.fill_like(params, checkpointing.unnest(encoder.params))
  batch_stats = checkpointing.fill_like(batch_stats, checkpointing.unnest(encoder.batch_stats))
  return params, batch_stats


def create_backbone_fn(source: EncoderSource, model_config: ml_collections.ConfigDict, *,
                       seed: int) -> Callable[[], backbones.VideoResNet]:
  """A zero-argument constructor of the backbone (bn_axis_name None: jit sharding)."""
  if model_config.dtype not in DTYPES:
    raise cv.ConfigError(f"config.model.dtype={model_config.dtype!r}: choose one of {DTYPES}.")
  dtype = jnp.dtype(model_config.dtype)
  bn_momentum = model_config.get("bn_momentum", 0.9)
  # How BatchNorm, the stem and the blocks' last ReLU compute (fine-tuning trains
  # through them too).
  options = backbones.compute_options(model_config)

  def create():
    # Rngs made inside, so the constructor can run under jit / eval_shape.
    return backbones.get_backbone(source.backbone, dtype=dtype, bn_axis_name=None,
                                  bn_momentum=bn_momentum, rngs=nnx.Rngs(seed), **options)

  return create


def build_frozen_encoder(source: EncoderSource, model_config: ml_collections.ConfigDict,
                         mesh: Mesh, *, seed: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """The backbone in eval mode: (graphdef, {'params', 'batch_stats'} replicated on `mesh`)."""
  create = create_backbone_fn(source, model_config, seed=seed)
  if source.checkpoint is None:
    graphdef, params, batch_stats = init_module_state(create, eval_mode=True)
  else:
    # Every leaf comes from the checkpoint: only the structure is needed, no init.
    abstract = nnx.eval_shape(create)
    abstract.eval()
    graphdef, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    params, batch_stats = load_backbone_weights(params, batch_stats, source.checkpoint)
  # Plain dicts: a jitted call flattens them in C++ (tcvm_jax/train_step.py's TrainState).
  state = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
  return graphdef, jax.device_put(state, mesh_lib.replicated_sharding(mesh))


def preprocess_views(videos: jax.Array, out_size: int, mean: Sequence[float],
                     std: Sequence[float], dtype: Any = jnp.float32) -> jax.Array:
  """uint8 views (B, T, S, S, 3) -> normalised (B, T, out, out, 3): centre square, resize."""
  return jax.vmap(lambda clip: augment.center_crop_resize(clip, out_size, dtype, mean, std)
                  )(videos)


def pooled_features(backbone: nnx.Module, videos: jax.Array) -> jax.Array:
  """(B, T, H, W, 3) -> (B, C) float32: backbone output averaged over T, h, w (TCVM.encode)."""
  return backbone(videos).astype(jnp.float32).mean(axis=(1, 2, 3))


@functools.lru_cache(maxsize=16)
def make_feature_fn(graphdef: nnx.GraphDef, *, out_size: int, mean: tuple[float, ...],
                    std: tuple[float, ...], dtype: Any) -> Callable[[dict, jax.Array], jax.Array]:
  """(state, uint8 views (B, T, S, S, 3)) -> (B, C) float32 pooled encoder features.

  Cached, so that encoders of one architecture (a checkpoint and its random-init
  baseline) share one compiled program.
  """

  def features(state, videos):
    backbone = nnx.merge(graphdef, state["params"], state["batch_stats"])
    return pooled_features(backbone, preprocess_views(videos, out_size, mean, std, dtype))

  return features


# --- Running a function over every view, averaged per video -----------------------------


@dataclasses.dataclass
class VideoOutputs:
  """Per-video means over views, sorted by video_index."""

  video_index: np.ndarray   # (N,) int64
  values: np.ndarray        # (N, D) float32: mean over the video's views
  labels: np.ndarray        # (N,) int64
  num_views: np.ndarray     # (N,) int64: views averaged


class PerVideoMean:
  """Host-side running sums of view outputs, keyed by video_index (padding masked out)."""

  def __init__(self):
    self._rows: dict[int, int] = {}
    self._sums: list[np.ndarray] = []
    self._counts: list[int] = []
    self._labels: list[int] = []

  def add(self, values: np.ndarray, video_index: np.ndarray, labels: np.ndarray,
          mask: np.ndarray) -> None:
    """values (B, D); video_index, labels, mask (B,). Rows with mask False are ignored."""
    mask = np.asarray(mask, bool)
    values = np.asarray(values, np.float64)[mask]
    video_index = np.asarray(video_index, np.int64)[mask]
    labels = np.asarray(labels, np.int64)[mask]
    if not video_index.size:
      return
    unique_ids, first, inverse = np.unique(video_index, return_index=True,
                                           return_inverse=True)
    batch_sums = np.zeros((unique_ids.size, values.shape[1]), np.float64)
    np.add.at(batch_sums, inverse, values)
    batch_counts = np.bincount(inverse, minlength=unique_ids.size)
    if np.any(labels != labels[first][inverse]):
      raise ValueError("Views of one video carry different labels; the input is corrupt.")
    for j, video in enumerate(unique_ids.tolist()):
      row = self._rows.get(video)
      if row is None:
        self._rows[video] = len(self._sums)
        self._sums.append(batch_sums[j])
        self._counts.append(int(batch_counts[j]))
        self._labels.append(int(labels[first[j]]))
      else:
        if self._labels[row] != labels[first[j]]:
          raise ValueError(f"Views of video_index {video} carry different labels.")
        self._sums[row] = self._sums[row] + batch_sums[j]
        self._counts[row] += int(batch_counts[j])

  def __len__(self) -> int:
    return len(self._rows)

  def result(self, expected_views: int | None = None) -> VideoOutputs:
    """The per-video means; with `expected_views`, every video must have exactly that many."""
    if not self._rows:
      raise ValueError("No views were seen (an empty split, or every record was bad).")
    video_index = np.fromiter(self._rows, np.int64, len(self._rows))
    order = np.argsort(video_index)
    rows = np.fromiter(self._rows.values(), np.int64, len(self._rows))[order]
    counts = np.asarray(self._counts, np.int64)[rows]
    if expected_views is not None and np.any(counts != expected_views):
      bad = video_index[order][counts != expected_views]
      raise ValueError(f"{bad.size} video(s) have a number of views other than "
                       f"{expected_views} (e.g. video_index {int(bad[0])}: "
                       f"{int(counts[counts != expected_views][0])} views).")
    sums = np.stack(self._sums)[rows]
    return VideoOutputs(video_index=video_index[order],
                        values=(sums / counts[:, None]).astype(np.float32),
                        labels=np.asarray(self._labels, np.int64)[rows], num_views=counts)


def pack_view_meta(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """(B, 4) int32 [index high word, index low word, label, mask]: int64 indices survive
  devices that run with 32-bit integers (jax_enable_x64 off)."""
  video_index = np.asarray(batch["video_index"], np.int64)
  unsigned = video_index.astype(np.uint64)  # padding's -1 wraps and comes back as -1
  high = (unsigned >> np.uint64(32)).astype(np.uint32).view(np.int32)
  low = (unsigned & np.uint64(_UINT32 - 1)).astype(np.uint32).view(np.int32)
  mask = np.asarray(batch.get("mask", np.ones(video_index.shape, bool)), bool)
  return np.stack([high, low, np.asarray(batch["label"], np.int32), mask.astype(np.int32)],
                  axis=1)


def unpack_view_meta(meta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inverse of `pack_view_meta`: (video_index int64, labels, mask)."""
  meta = np.asarray(meta, np.int32)
  high = meta[:, 0].view(np.uint32).astype(np.uint64)
  low = meta[:, 1].view(np.uint32).astype(np.uint64)
  video_index = ((high << np.uint64(32)) | low).view(np.int64)
  return video_index, meta[:, 2].astype(np.int64), meta[:, 3].astype(bool)


@functools.lru_cache(maxsize=16)
def _jit_view_fn(view_fn: Callable, mesh: Mesh,
                 compiler_options: tuple[tuple[str, Any], ...] = ()) -> Callable:
  """One compiled program per (view_fn, mesh, options): reused when a run evaluates again."""
  replicated = mesh_lib.replicated_sharding(mesh)
  sharded = mesh_lib.batch_sharding(mesh)
  return jax.jit(lambda state, videos, meta: (view_fn(state, videos), meta),
                 in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated),
                 compiler_options=dict(compiler_options) or None)


def make_view_runner(view_fn: Callable[[Any, jax.Array], jax.Array], mesh: Mesh,
                     compiler_options: dict[str, Any] | None = None
                     ) -> Callable[[Any, Mapping[str, np.ndarray]], tuple[np.ndarray, ...]]:
  """Jits `view_fn(state, uint8 videos) -> (B, D)` over the mesh (with XLA's
  `compiler_options`, `xla_options.for_mesh`).

  The returned runner takes this process's host batch (from `make_eval_dataset`) and
  returns the GLOBAL batch's (values, video_index, labels, mask) as NumPy on every
  process, so each process can average every video.
  """
  jitted = _jit_view_fn(view_fn, mesh, tuple(sorted((compiler_options or {}).items())))

  def run(state, host_batch):
    videos, meta = mesh_lib.host_batch_to_global(
        (host_batch["video"], pack_view_meta(host_batch)), mesh)
    values, meta = jitted(state, videos, meta)
    values = np.asarray(jax.device_get(values), np.float32)
    return (values, *unpack_view_meta(np.asarray(jax.device_get(meta))))

  return run


def average_over_views(runner: Callable, state: Any, batches: Iterable[Mapping[str, np.ndarray]],
                       *, expected_views: int | None, description: str = "views"
                       ) -> VideoOutputs:
  """Runs `runner` (from `make_view_runner`) over `batches`; per-video means."""
  accumulator = PerVideoMean()
  started = time.time()
  for batch_number, host_batch in enumerate(batches, start=1):
    values, video_index, labels, mask = runner(state, host_batch)
    accumulator.add(values, video_index, labels, mask)
    if batch_number % 50 == 0:
      logging.info("%s: %d batches, %d videos, %.1fs", description, batch_number,
                   len(accumulator), time.time() - started)
  outputs = accumulator.result(expected_views)
  logging.info("%s: %d videos x %d views in %.1fs.", description, outputs.video_index.size,
               expected_views or -1, time.time() - started)
  return outputs


# --- Nearest neighbours on device ---------------------------------------------------------


def l2_normalize(features: np.ndarray | jax.Array, eps: float = 1e-12):
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  xp = jnp if isinstance(features, jax.Array) else np
  norms = xp.sqrt(xp.sum(features * features, axis=-1, keepdims=True))
  return features / xp.maximum(norms, eps)


def _topk_over_gallery_blocks(queries: jax.Array, gallery_blocks: jax.Array,
                              gallery_valid: jax.Array, k: int
                              ) -> tuple[jax.Array, jax.Array]:
  """queries (Q, C); gallery_blocks (N, b, C); gallery_valid (N, b) -> top-k (Q, k) x2.

  A running top-k merged block by block; on ties the lower gallery index wins
  (lax.top_k keeps the earlier element, and earlier blocks come first).
  """
  num_queries = queries.shape[0]
  block_size = gallery_blocks.shape[1]

  def merge(carry, block):
    best_scores, best_ids = carry
    gallery, valid, offset = block
    scores = jnp.einsum("qc,gc->qg", queries, gallery,
                        precision=jax.lax.Precision.HIGHEST)  # (Q, b)
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    ids = offset + jnp.arange(block_size, dtype=jnp.int32)
    scores = jnp.concatenate([best_scores, scores], axis=1)
    ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, (num_queries, block_size))], axis=1)
    top_scores, positions = jax.lax.top_k(scores, k)
    return (top_scores, jnp.take_along_axis(ids, positions, axis=1)), None

  offsets = jnp.arange(gallery_blocks.shape[0], dtype=jnp.int32) * block_size
  init = (jnp.full((num_queries, k), -jnp.inf, jnp.float32),
          jnp.full((num_queries, k), -1, jnp.int32))
  (scores, ids), _ = jax.lax.scan(merge, init, (gallery_blocks, gallery_valid, offsets))
  return scores, ids


def _global_array(array: np.ndarray, sharding) -> jax.Array:
  """A global jax.Array from a host array that every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def nearest_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int, *,
                       block_size: int = 4096, query_block_size: int = 1024,
                       mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k most similar gallery rows of each query by dot product (cosine if normalised).

  queries (Q, C), gallery (G, C) -> (scores (Q, k) float32, indices (Q, k) int64), best
  first. The gallery is processed `block_size` rows at a time and queries
  `query_block_size` at a time, sharded over the mesh's `data` axis.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"queries (Q, C) and gallery (G, C) must share C; got {queries.shape} "
                     f"and {gallery.shape}.")
  num_gallery = gallery.shape[0]
  if not 1 <= k <= num_gallery:
    raise ValueError(f"k={k} must be in [1, gallery size={num_gallery}] (config.retrieval.ks).")
  if block_size < 1 or query_block_size < 1:
    raise ValueError(f"block_size={block_size} and query_block_size={query_block_size} "
                     f"(config.retrieval) must be >= 1.")
  if not queries.shape[0]:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  mesh = mesh or mesh_lib.create_mesh()
  num_devices = mesh.shape[mesh_lib.DATA_AXIS]
  replicated = mesh_lib.replicated_sharding(mesh)

  block_size = min(block_size, num_gallery)
  num_blocks = math.ceil(num_gallery / block_size)
  padded = np.zeros((num_blocks * block_size, gallery.shape[1]), np.float32)
  padded[:num_gallery] = gallery
  valid = np.arange(num_blocks * block_size) < num_gallery
  gallery_blocks = _global_array(padded.reshape(num_blocks, block_size, -1), replicated)
  gallery_valid = _global_array(valid.reshape(num_blocks, block_size), replicated)

  # A fixed query block (one compilation), a multiple of the device count.
  rows = min(query_block_size, queries.shape[0])
  rows = math.ceil(rows / num_devices) * num_devices
  topk = jax.jit(functools.partial(_topk_over_gallery_blocks, k=k),
                 in_shardings=(mesh_lib.batch_sharding(mesh), replicated, replicated),
                 out_shardings=(replicated, replicated))
  all_scores, all_ids = [], []
  for start in range(0, queries.shape[0], rows):
    block = np.zeros((rows, queries.shape[1]), np.float32)
    chunk = queries[start:start + rows]
    block[:chunk.shape[0]] = chunk
    scores, ids = topk(_global_array(block, mesh_lib.batch_sharding(mesh)), gallery_blocks,
                       gallery_valid)
    all_scores.append(np.asarray(jax.device_get(scores))[:chunk.shape[0]])
    all_ids.append(np.asarray(jax.device_get(ids))[:chunk.shape[0]])
  return np.concatenate(all_scores), np.concatenate(all_ids).astype(np.int64)


def topk_accuracy(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                  ks: Sequence[int]) -> dict[str, float]:
  """{'top{k}': share of queries with the class among their k nearest}, in [0, 1]."""
  hits = np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]  # (Q, K)
  any_hit = np.logical_or.accumulate(hits, axis=1)
  for k in ks:
    if not 1 <= k <= hits.shape[1]:
      raise ValueError(f"k={k} outside [1, {hits.shape[1]}] neighbours.")
  return {f"top{k}": float(any_hit[:, k - 1].mean()) for k in ks}


# --- The retrieval task -------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first retrieval setting outside its allowed range."""
  validate_data_config(config)
  cv.check_int(config, "retrieval.num_clips", 1)
  cv.check_choice(config, "retrieval.num_crops", (1, 3))
  ks = tuple(cv._get(config, "retrieval.ks"))  # pylint: disable=protected-access
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or list(ks) != sorted(set(ks)):
    raise cv.ConfigError(f"config.retrieval.ks={ks!r}: must be increasing positive integers.")
  cv.check_int(config, "retrieval.block_size", 1)
  cv.check_int(config, "retrieval.query_block_size", 1)
  cv.check_bool(config, "random_baseline")
  if config.retrieval.query_split == config.retrieval.gallery_split:
    raise cv.ConfigError(
        f"config.retrieval.query_split={config.retrieval.query_split!r} equals gallery_split: "
        f"queries would find themselves; use the test split against the train split.")
  if not config.init_checkpoint and not config.random_baseline:
    raise cv.ConfigError(
        "config.init_checkpoint is empty: pass --config.init_checkpoint=PRETRAIN_WORKDIR "
        "(or 'random'), or --config.random_baseline=True for the random-init row only.")


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Fields every downstream task reads: data, model, eval input and batch size."""
  cv.check_choice(config, "data.name", DATA_NAMES)
  cv.check_int(config, "data.num_frames", 1)
  cv.check_int(config, "data.frame_stride", 1)
  cv.check_choice(config, "data.sampler", cv.SAMPLERS)
  cv.check_choice(config, "data.short_video", cv.SHORT_VIDEO_MODES)
  cv.check_int(config, "data.input_size", 8)
  cv.check_number(config, "data.max_bad_record_fraction", 0.0, 1.0)
  cv.check_int(config, "eval.output_size", 8)
  cv.check_choice(config, "model.dtype", DTYPES)
  cv.check_choice(config, "model.backbone", (AUTO_BACKBONE,) + tuple(backbones.BACKBONES))
  cv.check_int(config, "batch_size", 1)
  cv.check_int(config, "seed", 0)
  if not isinstance(config.init_checkpoint, str):
    raise cv.ConfigError(f"config.init_checkpoint={config.init_checkpoint!r}: must be a path, "
                         "'random' or ''.")


def extract_video_features(config: ml_collections.ConfigDict, source: EncoderSource,
                           views_by_split: Mapping[str, tuple[int, int]], *, mesh: Mesh,
                           seed: int | None = None) -> dict[str, VideoOutputs]:
  """Per-video mean encoder features (not normalised) of each split.

  views_by_split: {split: (clips, crops)}; the encoder is built once for all of them.
  """
  from tcvm_jax.data import pipeline  # pylint: disable=import-outside-toplevel (TensorFlow)
  seed = config.seed if seed is None else seed
  graphdef, state = build_frozen_encoder(source, config.model, mesh, seed=seed)
  feature_fn = make_feature_fn(graphdef, out_size=config.eval.output_size,
                               mean=tuple(source.mean), std=tuple(source.std),
                               dtype=jnp.dtype(config.model.dtype))
  runner = make_view_runner(feature_fn, mesh, xla_options.for_mesh(source.backbone, mesh))
  batch_per_process = per_process_batch_size(config.batch_size, mesh)
  outputs = {}
  for split, (num_clips, num_crops) in views_by_split.items():
    batches = pipeline.make_eval_dataset(
        config, split, batch_size_per_process=batch_per_process, num_clips=num_clips,
        num_crops=num_crops, process_index=jax.process_index(),
        process_count=jax.process_count())
    outputs[split] = average_over_views(
        runner, state, batches, expected_views=num_clips * num_crops,
        description=f"{source.description} features, {split} split")
    expected = pipeline.num_records(pipeline.split_pattern(config, split))
    if outputs[split].video_index.size != expected:
      logging.warning("%s split: %d of %d videos were evaluated (bad records are skipped; see "
                      "the warnings above).", split, outputs[split].video_index.size, expected)
  return outputs


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of config.batch_size; it must split over every device."""
  mesh_lib.check_batch_divisible(global_batch_size, mesh)
  if global_batch_size % jax.process_count():
    raise cv.ConfigError(f"config.batch_size={global_batch_size}: must be a multiple of the "
                         f"number of processes ({jax.process_count()}).")
  return global_batch_size // jax.process_count()


def evaluate_retrieval(config: ml_collections.ConfigDict, source: EncoderSource, mesh: Mesh
                       ) -> dict[str, Any]:
  """One table row: {'encoder', 'top1', 'top5', ..., 'num_queries', 'num_gallery'}."""
  retrieval = config.retrieval
  views = (retrieval.num_clips, retrieval.num_crops)
  features = extract_video_features(
      config, source, {retrieval.gallery_split: views, retrieval.query_split: views},
      mesh=mesh)
  gallery, queries = features[retrieval.gallery_split], features[retrieval.query_split]
  ks = tuple(retrieval.ks)
  k = max(ks)
  if k > gallery.video_index.size:
    raise cv.ConfigError(f"config.retrieval.ks={ks}: the largest k must be <= the gallery "
                         f"size ({gallery.video_index.size} videos).")
  started = time.time()
  _, neighbours = nearest_neighbours(
      l2_normalize(queries.values), l2_normalize(gallery.values), k,
      block_size=retrieval.block_size, query_block_size=retrieval.query_block_size, mesh=mesh)
  logging.info("Nearest neighbours of %d queries in %d gallery videos: %.1fs.",
               queries.video_index.size, gallery.video_index.size, time.time() - started)
  accuracy = topk_accuracy(gallery.labels[neighbours], queries.labels, ks)
  return {"encoder": source.description, **accuracy,
          "num_queries": int(queries.video_index.size),
          "num_gallery": int(gallery.video_index.size)}


def protocol(config: ml_collections.ConfigDict, source: EncoderSource) -> dict[str, Any]:
  """What was measured, for results.json."""
  retrieval, data = config.retrieval, config.data
  return {
      "task": "retrieval",
      "dataset": config.get("dataset", data.name),
      "query_split": retrieval.query_split,
      "gallery_split": retrieval.gallery_split,
      "similarity": "cosine",
      "features": "backbone output mean-pooled over (T, h, w), averaged over the views of "
                  "each video, L2-normalised",
      "correct_at_k": "any of the k nearest gallery videos shares the query's class",
      "ks": list(retrieval.ks),
      "num_clips": retrieval.num_clips,
      "num_crops": retrieval.num_crops,
      "num_frames": data.num_frames,
      "frame_stride": data.frame_stride,
      "sampler": data.sampler,
      "input_size": data.input_size,
      "frame_size": config.eval.output_size,
      "backbone": source.backbone,
      "normalisation": {"mean": list(source.mean), "std": list(source.std)},
  }


def format_table(rows: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> str:
  """A Markdown table, accuracies in percent."""
  header = "| encoder | " + " | ".join(f"top-{k}" for k in ks) + " | queries | gallery |"
  rule = "|---|" + "---:|" * len(ks) + "---:|---:|"
  lines = [header, rule]
  for row in rows:
    cells = " | ".join(f"{100.0 * row[f'top{k}']:.1f}" for k in ks)
    lines.append(f"| {row['encoder']} | {cells} | {row['num_queries']} | "
                 f"{row['num_gallery']} |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Retrieval for config.init_checkpoint (and a random-init row when asked).

  Writes WORKDIR/results.json and WORKDIR/results.md on process 0; returns the results.
  The top-level top1/top5/top10 are those of the first row (the checkpoint when given).
  """
  from tcvm_jax import train  # pylint: disable=import-outside-toplevel (results writer)
  validate_config(config)
  workdir = os.path.abspath(workdir or config.workdir)
  mesh = mesh_lib.create_mesh()
  per_process_batch_size(config.batch_size, mesh)
  sources = []
  if config.init_checkpoint:
    sources.append(resolve_encoder(config, config.init_checkpoint))
  if config.random_baseline and not (sources and sources[0].checkpoint is None):
    sources.append(sources[0].random_like() if sources
                   else resolve_encoder(config, RANDOM_INIT))
  rows = []
  for source in sources:
    logging.info("Retrieval with the %s encoder (%s).", source.backbone, source.description)
    rows.append(evaluate_retrieval(config, source, mesh))
  ks = tuple(config.retrieval.ks)
  table = format_table(rows, ks)
  logging.info("Retrieval (%s queries vs %s gallery):\n%s", config.retrieval.query_split,
               config.retrieval.gallery_split, table)
  main_row = rows[0]
  results = {**{f"top{k}": main_row[f"top{k}"] for k in ks},
             "protocol": protocol(config, sources[0]), "rows": rows, "table": table}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    train.write_results(workdir, results, config)
    with open(os.path.join(workdir, TABLE_FILENAME), "w", encoding="utf-8") as f:
      f.write(table + "\n")
  return results
