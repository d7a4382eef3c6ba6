"""Video Montage (paper Sec. 3.2): cut, augment, shuffle across the global batch.

Each of the N source videos (T frames) is cut into s clips of T/s consecutive frames.
The clips are re-assembled into N pseudo-videos of s clips each:

  pseudo-video n, slot k  <-  clip k of source video  order[(n + offset_k) mod N]

where `order` is a random permutation of the N videos and offset_0..offset_{s-1} are s
distinct random values in [0, N). Clip k keeps its temporal slot k. Then
  * each (source, clip) is used exactly once (for fixed k, n -> n + offset_k is a bijection),
  * the s clips of a pseudo-video come from s different sources (distinct offsets; needs
    N >= s, otherwise sources repeat unavoidably),
  * the s clips of a source land in s different pseudo-videos (same reason).

`source_ids[n, k]` is the global index of the source of slot k: the contrastive label.

Variants (Table 3d) pick which clips share augmentation parameters; the parameters of a
slot are drawn from `fold_in(augment_key, id)`:
  'C-A-S' (paper) id = source * s + clip  every clip augmented independently.
  'A-C-S'         id = source             a source's clips share one parameter set.
  'C-S-A'         id = pseudo-video n     a pseudo-video's clips share one parameter set.
  'C-A'           no shuffle: pseudo-video n = source n, clips in order, id = n * s + k.
Because ids are global, the output depends only on the global batch and the key, not on
the number of devices.

Device layout: inside `jax.shard_map` over `data`, each device all-gathers the uint8 clips
of the whole batch (tiled), picks the clips of its own pseudo-videos and augments them, one
pseudo-video per `lax.map` step so that every device runs the same per-pseudo-video program:
outputs are bitwise equal on 1 and 4 devices (a plain vmap over all local clips lets XLA
reorder the contrast mean's float sum, ~1e-6 differences). The parameters are sampled
outside `shard_map` from the replicated key and sharded like the pseudo-videos.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from tcvm_jax import augment as augment_lib
from tcvm_jax import mesh as mesh_lib

VARIANTS = ("C-A-S", "A-C-S", "C-S-A", "C-A")


def _check_counts(num_videos: int, num_clips: int) -> None:
  if num_videos < 1:
    raise ValueError(f"Need at least one video in the batch, got {num_videos}.")
  if num_clips < 1:
    raise ValueError(f"montage.num_clips={num_clips} must be >= 1.")


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"montage.variant={variant!r}; choose from {VARIANTS}.")


def montage_assignment(key: jax.Array, num_videos: int,
                       num_clips: int) -> tuple[jax.Array, jax.Array]:
  """Which clip fills each slot: source_index (N, s) and clip_index (N, s), int32."""
  _check_counts(num_videos, num_clips)
  # Permutations as argsorts of random 32-bit words: one random call, so it compiles fast
  # (ties, and with them any bias, have probability ~N^2 / 2^33).
  words = jax.random.bits(key, (2, num_videos))
  video_order = jnp.argsort(words[0])  # (N,)
  if num_videos >= num_clips:
    offsets = jnp.argsort(words[1])[:num_clips]  # s distinct values in [0, N)
  else:
    # Fewer videos than slots: spread the slots over the videos as evenly as possible.
    start = (words[1, 0] % num_videos).astype(jnp.int32)
    offsets = (start + jnp.arange(num_clips, dtype=jnp.int32)) % num_videos
  rows = (jnp.arange(num_videos)[:, None] + offsets[None, :]) % num_videos  # (N, s)
  source_index = video_order[rows].astype(jnp.int32)
  clip_index = jnp.broadcast_to(jnp.arange(num_clips, dtype=jnp.int32), rows.shape)
  return source_index, clip_index


def identity_assignment(num_videos: int, num_clips: int) -> tuple[jax.Array, jax.Array]:
  """No shuffle ('C-A'): pseudo-video n is source n with its clips in order."""
  _check_counts(num_videos, num_clips)
  shape = (num_videos, num_clips)
  source_index = jnp.broadcast_to(jnp.arange(num_videos, dtype=jnp.int32)[:, None], shape)
  clip_index = jnp.broadcast_to(jnp.arange(num_clips, dtype=jnp.int32), shape)
  return source_index, clip_index


def augment_param_ids(source_index: jax.Array, clip_index: jax.Array,
                      variant: str) -> jax.Array:
  """(N, s) int32 ids; slots with equal ids get equal augmentation parameters."""
  _check_variant(variant)
  num_videos, num_clips = source_index.shape
  if variant in ("C-A-S", "C-A"):
    return source_index * num_clips + clip_index
  if variant == "A-C-S":
    return source_index
  return jnp.broadcast_to(jnp.arange(num_videos, dtype=jnp.int32)[:, None],
                          source_index.shape)  # 'C-S-A': per pseudo-video.


def montage_augment_params(key: jax.Array, param_ids: jax.Array, aug_config: Any,
                           in_hw: tuple[int, int], out_size: int) -> augment_lib.AugmentParams:
  """Parameters of every slot, leaves (N, s, ...), drawn from fold_in(key, id)."""
  sample = functools.partial(augment_lib.sample_augment_params, aug_config=aug_config,
                             in_hw=in_hw, out_size=out_size)
  sample_by_id = lambda param_id: sample(jax.random.fold_in(key, param_id))
  flat_params = jax.vmap(sample_by_id)(param_ids.reshape(-1))  # one vmap compiles faster
  return jax.tree.map(lambda leaf: leaf.reshape(param_ids.shape + leaf.shape[1:]), flat_params)


def _montage_shard(local_videos: jax.Array, local_gather_rows: jax.Array,
                   local_params: augment_lib.AugmentParams, *, num_clips: int,
                   dtype: Any) -> jax.Array:
  """Per device: gather every clip, keep this device's slots, augment them."""
  local_num, num_frames, height, width, channels = local_videos.shape
  clip_len = num_frames // num_clips
  local_clips = local_videos.reshape(local_num * num_clips, clip_len, height, width, channels)
  # Row r of the gathered array is clip r % s of global video r // s.
  all_clips = jax.lax.all_gather(local_clips, mesh_lib.DATA_AXIS, tiled=True)  # (N*s, L, H, W, 3)
  selected = jnp.take(all_clips, local_gather_rows, axis=0)  # (n, s, L, H, W, 3)
  # One pseudo-video (s clips, vmapped) per loop step: the same program whatever the
  # number of local pseudo-videos, so float reductions (the contrast mean) round the same
  # way on any number of devices and the output is bitwise device-count independent.
  augment_slots = jax.vmap(functools.partial(augment_lib.apply_augment, dtype=dtype))
  augmented = jax.lax.map(lambda args: augment_slots(*args), (local_params, selected))
  out_size = augmented.shape[3]  # (n, s, L, S, S, 3)
  return augmented.reshape(local_num, num_clips * clip_len, out_size, out_size, channels)


def video_montage(videos: jax.Array, key: jax.Array, *, mesh: Mesh, num_clips: int,
                  variant: str = "C-A-S", aug_config: Any = None, out_size: int | None = None,
                  dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Pseudo-videos (N, T, S, S, 3) `dtype` and source_ids (N, s) int32, both over `data`.

  videos: (N, T, H, W, 3) uint8, batch-sharded over the mesh's `data` axis.
  key: replicated PRNG key. aug_config: `config.augment`, or None to switch augmentation
  off (centred square crop resized to S, ImageNet normalisation). out_size: S (default H).
  """
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"Expected videos (N, T, H, W, 3), got shape {videos.shape}.")
  if videos.dtype != jnp.uint8:
    raise TypeError(f"Expected uint8 videos, got {videos.dtype}.")
  _check_variant(variant)
  num_videos, num_frames, height, width, _ = videos.shape
  _check_counts(num_videos, num_clips)
  if num_frames % num_clips:
    raise ValueError(f"data.num_frames={num_frames} is not divisible by "
                     f"montage.num_clips={num_clips}; clips must have equal length.")
  mesh_lib.check_batch_divisible(num_videos, mesh)
  out_size = height if out_size is None else out_size
  dtype = augment_lib.resolve_dtype(dtype)

  shuffle_key, augment_key = jax.random.split(key)
  if variant == "C-A":
    source_index, clip_index = identity_assignment(num_videos, num_clips)
  else:
    source_index, clip_index = montage_assignment(shuffle_key, num_videos, num_clips)
  if aug_config is None:
    single = augment_lib.center_crop_params((height, width), out_size)
    params = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, source_index.shape + leaf.shape),
                          single)
  else:
    param_ids = augment_param_ids(source_index, clip_index, variant)
    params = montage_augment_params(augment_key, param_ids, aug_config, (height, width),
                                    out_size)
  gather_rows = source_index * num_clips + clip_index  # (N, s) rows of the gathered clips.

  data = P(mesh_lib.DATA_AXIS)
  shard_fn = jax.shard_map(
      functools.partial(_montage_shard, num_clips=num_clips, dtype=dtype),
      mesh=mesh, in_specs=(data, data, data), out_specs=data)
  pseudo_videos = shard_fn(videos, gather_rows, params)
  source_ids = jax.lax.with_sharding_constraint(source_index, mesh_lib.batch_sharding(mesh))
  return pseudo_videos, source_ids


def make_montage_fn(config: ml_collections.ConfigDict, mesh: Mesh):
  """Jitted `fn(videos, key) -> (pseudo_videos, source_ids)` from `config.montage`,
  `config.augment` and `config.model.dtype`."""
  _check_variant(config.montage.variant)
  augment_lib.validate_augment_config(config.augment)
  fn = functools.partial(
      video_montage, mesh=mesh, num_clips=config.montage.num_clips,
      variant=config.montage.variant, aug_config=config.augment,
      out_size=config.montage.output_size, dtype=augment_lib.resolve_dtype(config.model.dtype))
  return jax.jit(fn)
