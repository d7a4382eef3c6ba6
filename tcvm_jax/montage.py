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

Device layout: inside `jax.shard_map` over `data`, each device sends the uint8 clips its
videos hold to the devices whose pseudo-videos need them, then augments all of its own
slots in one batched (vmapped) program. The parameters are sampled outside `shard_map`
from the replicated key and sharded like the pseudo-videos.

The exchange (`exchange=`):
  'all_to_all'  two balanced `all_to_all` rounds (`exchange_plan`): each device receives
                D * (C1 + C2) clips, C1 = ceil(M / D), C2 = min(M, floor(M / D) + D - 1),
                M = clips per device (s * local batch), D = devices. At 8 devices x 32
                videos x 4 clips: 312 clips instead of 1024.
  'all_gather'  every device receives all D * M clips (simple; kept for debugging).
  'auto'        (default) whichever receives fewer bytes.
The source_ids and the clips each slot receives are identical on any number of devices
and with either exchange. The augmented pixels agree to float rounding (~1e-6 on
normalised pixels): XLA may order the contrast mean's sum differently for a different
number of clips per device; with augmentation off they are exactly equal.

Device groups (`group_devices=G`, default 0 = all devices): the shuffle mixes only the
videos of G consecutive devices (N * G / D videos), each group with its own assignment
from fold_in(shuffle key, group); the exchange then runs among a group's devices only, so
a device receives at most G * M clips however many devices train. The paper shuffles
across the whole batch (8 GPUs x 4 videos); groups are for many devices, where the
whole-batch exchange grows with the device count (docs/performance.md). The loss still
contrasts the whole global batch; ids and augmentation parameters stay global.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from tcvm_jax import augment as augment_lib
from tcvm_jax import mesh as mesh_lib

VARIANTS = ("C-A-S", "A-C-S", "C-S-A", "C-A")
EXCHANGES = ("auto", "all_to_all", "all_gather")
GROUP_AXIS = "montage_group"  # the mesh axis over device groups (group_devices > 0)


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


def grouped_assignment(key: jax.Array, num_videos: int, num_clips: int,
                       num_groups: int) -> tuple[jax.Array, jax.Array]:
  """`montage_assignment` within each of `num_groups` consecutive blocks of the batch:
  group g draws from fold_in(key, g) and shuffles only its own N / num_groups videos.
  Returns global (N, s) source_index and clip_index."""
  if num_videos % num_groups:
    raise ValueError(f"{num_videos} videos do not split into {num_groups} device groups.")
  videos_per_group = num_videos // num_groups
  group_keys = jax.vmap(lambda group: jax.random.fold_in(key, group))(jnp.arange(num_groups))
  source_index, clip_index = jax.vmap(
      lambda group_key: montage_assignment(group_key, videos_per_group, num_clips))(group_keys)
  first_video = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None] * videos_per_group
  return ((source_index + first_video).reshape(num_videos, num_clips),
          clip_index.reshape(num_videos, num_clips))


def num_device_groups(group_devices: int, num_devices: int) -> int:
  """How many groups of `group_devices` devices (0: one group of all devices)."""
  if group_devices < 0 or (group_devices and num_devices % group_devices):
    raise ValueError(f"montage.group_devices={group_devices} must be 0 (all devices) or "
                     f"divide the device count ({num_devices}).")
  return num_devices // group_devices if group_devices else 1


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExchangePlan:
  """Index tables of the two-round all_to_all exchange, leading axis = device.

  Indices equal to the indexed axis' size mark empty places (gathered as zeros).
    send_1[d, i, p]  which local clip device d puts at place p of its chunk for device i.
    send_2[i, e, p]  which clip of its round-1 receive buffer (flattened (D * C1), source
                     major) device i puts at place p of its chunk for device e.
    final[e, q]      where local slot q (pseudo-video q // s, clip q % s) of device e is
                     in its round-2 receive buffer (flattened (D * C2)).
  """
  send_1: jax.Array  # (D, D, C1) int32
  send_2: jax.Array  # (D, D, C2) int32
  final: jax.Array   # (D, M) int32


def exchange_capacities(clips_per_device: int, num_devices: int) -> tuple[int, int]:
  """(C1, C2): places per (sender, receiver) pair in the two all_to_all rounds.

  Round 1 deals each device's clips, sorted by destination, round-robin over the D
  devices: at most ceil(M / D) per receiver. The c(d, e) clips from d to e are
  consecutive in d's order, so each relay receives at most ceil(c(d, e) / D) of them;
  summed over the sources (sum_d c(d, e) = M) that is at most M / D + D - 1 per
  (relay, destination) pair, and never more than M. (The plan's scatters would drop a
  clip past these bounds; tests/test_montage.py checks delivery on many assignments.)
  """
  capacity_1 = -(-clips_per_device // num_devices)
  capacity_2 = min(clips_per_device, clips_per_device // num_devices + num_devices - 1)
  return capacity_1, capacity_2


def exchange_plan(gather_rows: jax.Array, num_devices: int) -> ExchangePlan:
  """Routes clip `gather_rows[n, k]` (row = source * s + clip) to slot (n, k) in two
  balanced all_to_all rounds over `num_devices` devices holding equal batch shards.

  Every device computes the same plan from the replicated assignment. Round 1: each
  device sorts its clips by destination slot and deals them round-robin to all devices
  (relays). Round 2: each relay forwards what it holds to the destinations.
  """
  num_videos, num_clips = gather_rows.shape
  total = num_videos * num_clips
  if total % num_devices:
    raise ValueError(f"{num_videos} videos x {num_clips} clips do not split over "
                     f"{num_devices} devices.")
  per_device = total // num_devices  # M
  capacity_1, capacity_2 = exchange_capacities(per_device, num_devices)
  slot_of_clip = jnp.zeros(total, jnp.int32).at[gather_rows.reshape(-1)].set(
      jnp.arange(total, dtype=jnp.int32))  # which slot takes global clip g
  clip_ids = jnp.arange(total, dtype=jnp.int32)
  source_device = clip_ids // per_device
  dest_device = slot_of_clip // per_device

  # Round 1: rank of each clip among its device's clips, sorted by destination slot.
  by_source = jnp.argsort(source_device * total + slot_of_clip)
  rank = jnp.zeros(total, jnp.int32).at[by_source].set(clip_ids % per_device)
  relay = rank % num_devices
  place_1 = rank // num_devices
  send_1 = jnp.full((num_devices, num_devices, capacity_1), per_device, jnp.int32)
  send_1 = send_1.at[source_device, relay, place_1].set(clip_ids % per_device)

  # Round 2: at each relay, number the clips bound for each destination.
  group = relay * num_devices + dest_device  # (relay, destination) pair
  by_group = jnp.argsort(group * total + slot_of_clip)
  sorted_group = group[by_group]
  group_start = jnp.searchsorted(sorted_group, sorted_group, side="left")
  place_2 = jnp.zeros(total, jnp.int32).at[by_group].set(
      jnp.arange(total, dtype=jnp.int32) - group_start.astype(jnp.int32))
  received_1 = source_device * capacity_1 + place_1  # where the relay holds it
  send_2 = jnp.full((num_devices, num_devices, capacity_2), num_devices * capacity_1,
                    jnp.int32)
  send_2 = send_2.at[relay, dest_device, place_2].set(received_1)

  received_2 = relay * capacity_2 + place_2  # where the destination holds it
  final = jnp.zeros((num_devices, per_device), jnp.int32)
  final = final.at[dest_device, slot_of_clip % per_device].set(received_2)
  return ExchangePlan(send_1=send_1, send_2=send_2, final=final)


def choose_exchange(exchange: str, clips_per_device: int, num_devices: int) -> str:
  """'auto' -> the exchange that receives fewer clips per device."""
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}; choose from {EXCHANGES}.")
  if exchange != "auto":
    return exchange
  if num_devices == 1:
    return "all_gather"  # a local gather; no collective either way
  capacity_1, capacity_2 = exchange_capacities(clips_per_device, num_devices)
  return "all_to_all" if capacity_1 + capacity_2 < clips_per_device else "all_gather"


def _take(clips: jax.Array, rows: jax.Array) -> jax.Array:
  """clips[rows] along axis 0; rows == len(clips) give zeros (empty places)."""
  return jnp.take(clips, rows, axis=0, mode="fill", fill_value=0)


def _exchange_all_to_all(local_clips: jax.Array, gather_rows: jax.Array) -> jax.Array:
  """(M, L, H, W, 3) clips this device holds -> (M, ...) clips of its own slots."""
  num_devices = jax.lax.axis_size(mesh_lib.DATA_AXIS)
  device = jax.lax.axis_index(mesh_lib.DATA_AXIS)
  plan = jax.tree.map(lambda table: table[device], exchange_plan(gather_rows, num_devices))
  _, capacity_1 = plan.send_1.shape
  capacity_2 = plan.send_2.shape[1]
  clip_shape = local_clips.shape[1:]
  chunks = _take(local_clips, plan.send_1.reshape(-1))
  chunks = chunks.reshape(num_devices, capacity_1, *clip_shape)
  received = jax.lax.all_to_all(chunks, mesh_lib.DATA_AXIS, 0, 0)  # (D, C1, ...) by source
  chunks = _take(received.reshape(-1, *clip_shape), plan.send_2.reshape(-1))
  chunks = chunks.reshape(num_devices, capacity_2, *clip_shape)
  received = jax.lax.all_to_all(chunks, mesh_lib.DATA_AXIS, 0, 0)  # (D, C2, ...) by relay
  return jnp.take(received.reshape(-1, *clip_shape), plan.final, axis=0)


def _exchange_all_gather(local_clips: jax.Array, gather_rows: jax.Array) -> jax.Array:
  """Every clip to every device, then the rows of this device's slots: (M, ...)."""
  # Row r of the gathered array is clip r % s of global video r // s.
  if jax.lax.axis_size(mesh_lib.DATA_AXIS) == 1:
    all_clips = local_clips  # one device: no collective at all
  else:
    all_clips = jax.lax.all_gather(local_clips, mesh_lib.DATA_AXIS, tiled=True)
  local_rows = jax.lax.dynamic_slice_in_dim(
      gather_rows.reshape(-1), jax.lax.axis_index(mesh_lib.DATA_AXIS) * len(local_clips),
      len(local_clips))
  return jnp.take(all_clips, local_rows, axis=0)


def _montage_shard(local_videos: jax.Array, gather_rows: jax.Array,
                   local_params: augment_lib.AugmentParams, *, num_clips: int, dtype: Any,
                   exchange: str, augment_compute: augment_lib.ComputeOptions
                   ) -> jax.Array:
  """Per device: fetch the clips of this device's slots, augment them all at once.

  gather_rows: the whole (N, s) assignment (replicated); the rest is this device's.
  """
  local_num, num_frames, height, width, channels = local_videos.shape
  clip_len = num_frames // num_clips
  local_clips = local_videos.reshape(local_num * num_clips, clip_len, height, width, channels)
  if exchange == "all_to_all":
    slot_clips = _exchange_all_to_all(local_clips, gather_rows)  # (n * s, L, H, W, 3)
  else:
    slot_clips = _exchange_all_gather(local_clips, gather_rows)
  flat_params = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), local_params)
  augmented = augment_lib.augment_clips(flat_params, slot_clips, dtype,
                                        augment_compute)  # (n * s, L, S, S, 3)
  out_size = augmented.shape[2]
  return augmented.reshape(local_num, num_clips * clip_len, out_size, out_size, channels)


def video_montage(videos: jax.Array, key: jax.Array, *, mesh: Mesh, num_clips: int,
                  variant: str = "C-A-S", aug_config: Any = None, out_size: int | None = None,
                  dtype: Any = jnp.float32, exchange: str = "auto", group_devices: int = 0,
                  augment_compute: augment_lib.ComputeOptions = augment_lib.ComputeOptions()
                  ) -> tuple[jax.Array, jax.Array]:
  """Pseudo-videos (N, T, S, S, 3) `dtype` and source_ids (N, s) int32, both over `data`.

  videos: (N, T, H, W, 3) uint8, batch-sharded over the mesh's `data` axis.
  key: replicated PRNG key. aug_config: `config.augment`, or None to switch augmentation
  off (centred square crop resized to S, ImageNet normalisation). out_size: S (default H).
  exchange: how clips move between devices, 'auto', 'all_to_all' or 'all_gather' (see
  the module docstring); the result does not depend on it.
  group_devices: shuffle within groups of this many consecutive devices (0: all).
  augment_compute: how the augmentation computes (planes' dtype, blur, jitter kernel;
  `augment_lib.compute_options(config.augment)`); the result does not depend on it beyond
  rounding.
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
  num_devices = mesh.shape[mesh_lib.DATA_AXIS]
  num_groups = num_device_groups(group_devices, num_devices)
  devices_per_group = num_devices // num_groups
  exchange = choose_exchange(exchange, num_videos * num_clips // num_devices,
                             devices_per_group)
  out_size = height if out_size is None else out_size
  dtype = augment_lib.resolve_dtype(dtype)

  shuffle_key, augment_key = jax.random.split(key)
  if variant == "C-A":
    source_index, clip_index = identity_assignment(num_videos, num_clips)
  elif num_groups == 1:
    source_index, clip_index = montage_assignment(shuffle_key, num_videos, num_clips)
  else:
    source_index, clip_index = grouped_assignment(shuffle_key, num_videos, num_clips,
                                                  num_groups)
  if aug_config is None:
    single = augment_lib.center_crop_params((height, width), out_size)
    params = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, source_index.shape + leaf.shape),
                          single)
  else:
    param_ids = augment_param_ids(source_index, clip_index, variant)
    params = montage_augment_params(augment_key, param_ids, aug_config, (height, width),
                                    out_size)
  # Every device needs the whole assignment: computed replicated from the replicated key
  # (left alone, XLA computes it split like source_ids and all-gathers it).
  source_index = jax.lax.with_sharding_constraint(source_index,
                                                  mesh_lib.replicated_sharding(mesh))
  gather_rows = source_index * num_clips + clip_index  # (N, s) rows of the gathered clips.

  shard = functools.partial(_montage_shard, num_clips=num_clips, dtype=dtype,
                            exchange=exchange, augment_compute=augment_compute)
  if num_groups == 1:
    data = P(mesh_lib.DATA_AXIS)
    # gather_rows go in replicated: each device derives its part of the exchange from the
    # whole assignment (computed outside, sharding propagation would split the plan's
    # scatters over the devices and all-gather them back: two extra collectives).
    shard_fn = jax.shard_map(shard, mesh=mesh, in_specs=(data, P(), data), out_specs=data)
    pseudo_videos = shard_fn(videos, gather_rows, params)
  else:
    # The same devices as a (groups, devices per group) mesh: the batch keeps its layout,
    # and the exchange's collectives run over `data`, now a group's devices only.
    group_mesh = Mesh(mesh.devices.reshape(num_groups, devices_per_group),
                      (GROUP_AXIS, mesh_lib.DATA_AXIS))
    data = P((GROUP_AXIS, mesh_lib.DATA_AXIS))
    videos_per_group = num_videos // num_groups
    first_row = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None] * (
        videos_per_group * num_clips)
    group_rows = gather_rows.reshape(num_groups, videos_per_group, num_clips) - first_row
    shard_fn = jax.shard_map(
        lambda v, rows, p: shard(v, rows[0], p), mesh=group_mesh,
        in_specs=(data, P(GROUP_AXIS), data), out_specs=data)
    pseudo_videos = shard_fn(videos, group_rows, params)
    # Back on the caller's mesh (the same layout), so callers see one mesh throughout.
    pseudo_videos = jax.lax.with_sharding_constraint(pseudo_videos,
                                                     mesh_lib.batch_sharding(mesh))
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
      out_size=config.montage.output_size, dtype=augment_lib.resolve_dtype(config.model.dtype),
      group_devices=config.montage.get("group_devices", 0),
      augment_compute=augment_lib.compute_options(config.augment))
  return jax.jit(fn)
