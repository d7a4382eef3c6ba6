"""Video Montage: assignment invariants, exact content, variant parameter sharing, devices."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from tcvm_jax import augment, mesh as mesh_lib, montage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = mesh_lib.create_mesh(jax.devices()[:1])


def assignments(num_videos: int, num_clips: int, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
  keys = jax.random.split(jax.random.key(1000 * num_videos + num_clips), num_keys)
  sources, clips = jax.jit(jax.vmap(
      lambda k: montage.montage_assignment(k, num_videos, num_clips)))(keys)
  return np.asarray(sources), np.asarray(clips)


def id_videos(num_videos: int, num_frames: int, size: int) -> np.ndarray:
  """Pixels encode (video, frame, position) so any mix-up shows."""
  videos = np.zeros((num_videos, num_frames, size, size, 3), np.uint8)
  videos[..., 0] = np.arange(num_videos)[:, None, None, None] * 9
  videos[..., 1] = np.arange(num_frames)[None, :, None, None] * 13
  videos[..., 2] = (np.arange(size * size).reshape(size, size) * 5) % 256
  return videos


def slot_clips(pseudo_videos: np.ndarray, num_clips: int) -> np.ndarray:
  """(N, T, ...) -> (N, s, T/s, ...)."""
  num, frames = pseudo_videos.shape[:2]
  return pseudo_videos.reshape(num, num_clips, frames // num_clips, *pseudo_videos.shape[2:])


# --- The assignment ---------------------------------------------------------------------


@pytest.mark.parametrize("num_videos,num_clips", [
    (1, 4), (3, 4), (4, 4), (6, 4), (7, 3), (64, 4), (5, 1), (9, 8)])
def test_assignment_invariants(num_videos, num_clips):
  sources, clips = assignments(num_videos, num_clips, num_keys=300)
  assert sources.shape == clips.shape == (300, num_videos, num_clips)
  assert sources.dtype == clips.dtype == np.int32
  # Clip k keeps temporal slot k (our documented choice).
  np.testing.assert_array_equal(clips, np.broadcast_to(np.arange(num_clips), clips.shape))
  # Every (source, clip) is used exactly once.
  pair_ids = np.sort((sources * num_clips + clips).reshape(300, -1), axis=1)
  np.testing.assert_array_equal(pair_ids, np.tile(np.arange(num_videos * num_clips), (300, 1)))
  per_row = np.stack([(sources == m).sum(axis=2) for m in range(num_videos)], axis=-1)
  if num_videos >= num_clips:
    # s different sources per pseudo-video, and a source's clips in s different ones.
    assert per_row.max() == 1
    for batch in sources[:50]:
      for m in range(num_videos):
        rows = np.nonzero(batch == m)[0]
        assert len(set(rows.tolist())) == num_clips
  else:
    # Unavoidable repeats are spread as evenly as possible.
    assert per_row.max() == math.ceil(num_clips / num_videos)
    assert per_row.min() == num_clips // num_videos


def test_assignment_is_random_and_deterministic():
  sources, _ = assignments(8, 4, num_keys=800)
  # The source of slot (0, 0) is uniform over the 8 videos.
  counts = np.bincount(sources[:, 0, 0], minlength=8)
  assert counts.min() > 100 - 5 * 9.4 and counts.max() < 100 + 5 * 9.4  # binomial sd ~9.4
  assert len({batch.tobytes() for batch in sources}) > 790
  again = montage.montage_assignment(jax.random.split(jax.random.key(8004), 800)[3], 8, 4)
  np.testing.assert_array_equal(np.asarray(again[0]), sources[3])


def test_identity_assignment_is_no_shuffle():
  sources, clips = montage.identity_assignment(5, 3)
  np.testing.assert_array_equal(np.asarray(sources), np.repeat(np.arange(5)[:, None], 3, 1))
  np.testing.assert_array_equal(np.asarray(clips), np.tile(np.arange(3), (5, 1)))


# --- Content without augmentation -------------------------------------------------------


@pytest.mark.parametrize("num_videos,variant", [(6, "C-A-S"), (3, "C-A-S"), (4, "C-A")])
def test_slots_hold_exact_source_clips(num_videos, variant):
  num_clips, num_frames, size = 4, 8, 8
  videos = id_videos(num_videos, num_frames, size)
  fn = jax.jit(lambda v, k: montage.video_montage(
      v, k, mesh=MESH, num_clips=num_clips, variant=variant, aug_config=None))
  pseudo_videos, source_ids = fn(jnp.asarray(videos), jax.random.key(5))
  assert pseudo_videos.shape == (num_videos, num_frames, size, size, 3)
  assert pseudo_videos.dtype == jnp.float32 and source_ids.dtype == jnp.int32
  frames = slot_clips(np.asarray(augment.denormalize_to_uint8(pseudo_videos)), num_clips)
  source_ids = np.asarray(source_ids)
  source_clips = slot_clips(videos, num_clips)  # (N, s, L, H, W, 3)
  for n in range(num_videos):
    for k in range(num_clips):
      np.testing.assert_array_equal(frames[n, k], source_clips[source_ids[n, k], k])
  # source_ids name the video the pixels came from.
  np.testing.assert_array_equal(frames[:, :, 0, 0, 0, 0] // 9, source_ids)
  if variant == "C-A":
    np.testing.assert_array_equal(source_ids, np.repeat(np.arange(num_videos)[:, None], 4, 1))
  elif num_videos >= num_clips:
    assert all(len(set(row)) == num_clips for row in source_ids.tolist())


# --- Which slots share augmentation parameters ------------------------------------------


def param_fingerprints(params: augment.AugmentParams) -> np.ndarray:
  """(N, s, F) float64 concatenation of every parameter leaf."""
  leaves = [np.asarray(leaf, np.float64).reshape(leaf.shape[:2] + (-1,))
            for leaf in jax.tree.leaves(params)]
  return np.concatenate(leaves, axis=-1)


def sharing_matrix(fingerprints: np.ndarray) -> np.ndarray:
  flat = fingerprints.reshape(-1, fingerprints.shape[-1])
  return (flat[:, None, :] == flat[None, :, :]).all(axis=-1)


@pytest.mark.parametrize("variant", montage.VARIANTS)
def test_variant_parameter_sharing(variant):
  num_videos, num_clips = 6, 3
  config = get_config().augment
  key = jax.random.key(11)
  if variant == "C-A":
    sources, clips = montage.identity_assignment(num_videos, num_clips)
  else:
    sources, clips = montage.montage_assignment(key, num_videos, num_clips)
  sample = jax.jit(lambda k, ids: montage.montage_augment_params(k, ids, config, (16, 16), 12))
  params = sample(key, montage.augment_param_ids(sources, clips, variant))
  shared = sharing_matrix(param_fingerprints(params))
  source_of = np.asarray(sources).reshape(-1)
  row_of = np.repeat(np.arange(num_videos), num_clips)
  slot_of = np.arange(num_videos * num_clips)
  expected_group = {"C-A-S": slot_of, "C-A": slot_of, "A-C-S": source_of, "C-S-A": row_of}
  group = expected_group[variant]
  np.testing.assert_array_equal(shared, group[:, None] == group[None, :])
  if variant in ("C-A-S", "C-A"):
    # A clip's parameters depend on (source, clip), not on where the shuffle puts it.
    unshuffled = sample(key, montage.augment_param_ids(
        *montage.identity_assignment(num_videos, num_clips), "C-A"))
    by_pair = param_fingerprints(unshuffled)
    ours = param_fingerprints(params)
    clip_of = np.asarray(clips)
    for n in range(num_videos):
      for k in range(num_clips):
        np.testing.assert_array_equal(ours[n, k], by_pair[source_of[n * num_clips + k],
                                                          clip_of[n, k]])


def static_videos(num_videos, num_frames, size, seed, same_for_all=False) -> np.ndarray:
  """Each video is one random image held still; optionally the same image for all."""
  images = np.random.RandomState(seed).randint(0, 256, (num_videos, 1, size, size, 3))
  if same_for_all:
    images = np.repeat(images[:1], num_videos, axis=0)
  return np.repeat(images, num_frames, axis=1).astype(np.uint8)


def test_outputs_reveal_variant_sharing():
  num_videos, num_clips, num_frames = 4, 2, 4
  config = get_config("demo")
  config.montage.num_clips, config.montage.output_size = num_clips, 12
  key = jax.random.key(3)
  per_video = jnp.asarray(static_videos(num_videos, num_frames, 16, seed=0))
  identical = jnp.asarray(static_videos(num_videos, num_frames, 16, seed=1, same_for_all=True))

  def run(variant, videos):
    config.montage.variant = variant
    pseudo_videos, source_ids = montage.make_montage_fn(config, MESH)(videos, key)
    return slot_clips(np.asarray(pseudo_videos), num_clips), np.asarray(source_ids)

  # 'A-C-S': a still video's clips are equal inputs with shared params -> equal outputs.
  clips, source_ids = run("A-C-S", per_video)
  for m in range(num_videos):
    outputs = clips[source_ids == m]  # (s, L, S, S, 3)
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
  # 'C-A-S': the same inputs with independent params differ.
  clips, source_ids = run("C-A-S", per_video)
  for m in range(num_videos):
    outputs = clips[source_ids == m]
    assert not all(np.array_equal(outputs[0], other) for other in outputs[1:])
  # 'C-S-A': all inputs equal -> the slots of a pseudo-video are equal, others differ.
  clips, _ = run("C-S-A", identical)
  for n in range(num_videos):
    assert np.array_equal(clips[n, 0], clips[n, 1])
  assert not np.array_equal(clips[0, 0], clips[1, 0])
  # Every frame of a clip shares its parameters: still inputs stay still.
  np.testing.assert_array_equal(clips, np.broadcast_to(clips[:, :, :1], clips.shape))


# --- Errors and the multi-device run ----------------------------------------------------


def test_bad_settings_raise_clear_errors():
  videos = jnp.zeros((4, 6, 8, 8, 3), jnp.uint8)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="data.num_frames=6.*montage.num_clips=4"):
    montage.video_montage(videos, key, mesh=MESH, num_clips=4)
  with pytest.raises(ValueError, match="montage.variant"):
    montage.video_montage(videos, key, mesh=MESH, num_clips=2, variant="S-C-A")
  with pytest.raises(TypeError, match="uint8"):
    montage.video_montage(videos.astype(jnp.float32), key, mesh=MESH, num_clips=2)
  with pytest.raises(ValueError, match="montage.num_clips"):
    montage.montage_assignment(key, 4, 0)
  config = get_config()
  config.montage.variant = "CAS"
  with pytest.raises(ValueError, match="montage.variant"):
    montage.make_montage_fn(config, MESH)


def test_one_and_four_devices_and_both_exchanges_agree():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, str(REPO_ROOT / "tests/multidevice_montage_check.py")],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  clip_bytes = 2 * 16 * 16 * 3  # L=2 frames of 16x16 RGB uint8 (8 videos x 8 frames, s=4)
  num_devices, clips_per_device = 4, 8
  capacity_1, capacity_2 = montage.exchange_capacities(clips_per_device, num_devices)
  for name in ("C-A-S/aug", "C-A-S/noaug"):
    for exchange in ("all_to_all", "all_gather"):
      case = report[f"{name}/{exchange}"]
      # 4 devices vs 1: the same assignment, pixels equal to float rounding (exactly
      # equal without augmentation).
      assert case["ids_equal"], (name, exchange)
      assert case["max_abs_diff"] <= 1e-5, (name, exchange, case["max_abs_diff"])
      if name.endswith("noaug"):
        assert case["videos_equal"] and case["content_exact"], (name, exchange)
      assert case["num_shards"] == 4 and case["spec"] == "P('data',)"
      assert len(case["shard_shapes"]) == 1 and case["shard_shapes"][0][0] == 2  # 8 / 4
      source_ids = np.asarray(case["source_ids"])
      assert all(len(set(row)) == 4 for row in source_ids.tolist())
      np.testing.assert_array_equal(np.sort(source_ids.reshape(-1)), np.repeat(np.arange(8), 4))
      # Bytes each device receives per step, from the compiled HLO.
      collectives = case["collectives"]
      if exchange == "all_gather":
        assert collectives == {"all-gather": {
            "count": 1, "bytes": num_devices * clips_per_device * clip_bytes}}
      else:  # what 'auto' picks here: 2 + 5 < 8 clips per (sender, receiver)
        assert montage.choose_exchange("auto", clips_per_device, num_devices) == exchange
        assert collectives == {"all-to-all": {
            "count": 2, "bytes": num_devices * (capacity_1 + capacity_2) * clip_bytes}}
    # Same devices, either exchange: the same clips reach the same program, bit for bit.
    both = report[f"{name}/all_to_all_vs_all_gather"]
    assert both["ids_equal"] and both["videos_equal"], (name, both["max_abs_diff"])
  assert "config.batch_size=6" in report["indivisible_batch_error"]

  # Device groups. One group of all 4 devices is the default, bit for bit.
  whole = report["groups/4_vs_default"]
  assert whole["ids_equal"] and whole["videos_equal"]
  for group_devices in (2, 1):
    videos_per_group = 8 * group_devices // num_devices
    for exchange in ("all_to_all", "all_gather"):
      case = report[f"groups/{group_devices}/{exchange}"]
      source_ids = np.asarray(case["source_ids"])  # (8, 4)
      # Pseudo-video n mixes only the videos of its own group of devices ...
      groups_of_sources = source_ids // videos_per_group
      np.testing.assert_array_equal(
          groups_of_sources, np.repeat(np.arange(8) // videos_per_group, 4).reshape(8, 4))
      # ... every (video, clip) is used exactly once, in its own temporal slot ...
      np.testing.assert_array_equal(np.sort(source_ids.reshape(-1)),
                                    np.repeat(np.arange(8), 4))
      for k in range(4):
        assert sorted(source_ids[:, k]) == list(range(8))
      if videos_per_group >= 4:  # ... from distinct videos where the group has enough.
        assert all(len(set(row)) == 4 for row in source_ids.tolist())
      assert case["content_exact"], (group_devices, exchange)
      # A device exchanges clips with its group only (capacities for G devices, not 4);
      # a group of 1 has no collective at all.
      received = sum(v["bytes"] for v in case["collectives"].values())
      if group_devices == 1:
        assert case["collectives"] == {}
      elif exchange == "all_gather":
        assert received == group_devices * clips_per_device * clip_bytes
      else:
        group_capacities = montage.exchange_capacities(clips_per_device, group_devices)
        assert received == group_devices * sum(group_capacities) * clip_bytes
  assert "group_devices=3" in report["bad_group_error"]


# --- The all_to_all exchange plan (simulated in NumPy) ------------------------------------


def simulate_exchange(plan: montage.ExchangePlan, num_devices: int,
                      clips_per_device: int) -> np.ndarray:
  """Moves global clip ids through the two all_to_all rounds; (D, M) ids per slot."""
  send_1, send_2, final = (np.asarray(table) for table in (plan.send_1, plan.send_2,
                                                            plan.final))
  empty = -1
  held = np.arange(num_devices * clips_per_device).reshape(num_devices, clips_per_device)
  # Round 1: device d's chunk for device i; device i receives them source-major.
  chunks = np.where(send_1 < clips_per_device,
                    np.take_along_axis(held[:, None, :],
                                       np.minimum(send_1, clips_per_device - 1), axis=2),
                    empty)  # (sender d, receiver i, C1)
  received_1 = chunks.transpose(1, 0, 2).reshape(num_devices, -1)  # (i, D * C1)
  size_1 = received_1.shape[1]
  chunks = np.where(send_2 < size_1,
                    np.take_along_axis(received_1[:, None, :], np.minimum(send_2, size_1 - 1),
                                       axis=2), empty)  # (relay i, destination e, C2)
  received_2 = chunks.transpose(1, 0, 2).reshape(num_devices, -1)  # (e, D * C2)
  return np.take_along_axis(received_2, final, axis=1)


def pair_counts(gather_rows: np.ndarray, num_devices: int) -> np.ndarray:
  """(D, D) clips device d sends to device e, counted directly."""
  per_device = gather_rows.size // num_devices
  counts = np.zeros((num_devices, num_devices), int)
  for slot, clip in enumerate(gather_rows.reshape(-1)):
    counts[clip // per_device, slot // per_device] += 1
  return counts


@pytest.mark.parametrize("num_videos,num_clips,num_devices", [
    (8, 4, 4), (8, 4, 1), (8, 4, 2), (8, 4, 8), (12, 4, 3), (6, 4, 2), (3, 4, 3), (32, 4, 8),
    (16, 3, 4), (5, 1, 5)])
def test_exchange_plan_delivers_every_clip_to_its_slot(num_videos, num_clips, num_devices):
  keys = jax.random.split(jax.random.key(num_videos * 100 + num_devices), 20)
  plan_fn = jax.jit(lambda rows: montage.exchange_plan(rows, num_devices))
  clips_per_device = num_videos * num_clips // num_devices
  capacity_1, capacity_2 = montage.exchange_capacities(clips_per_device, num_devices)
  assignments = [montage.identity_assignment(num_videos, num_clips)]  # all clips stay home
  assignments += [montage.montage_assignment(key, num_videos, num_clips) for key in keys]
  max_pair = 0
  for sources, clips in assignments:
    gather_rows = np.asarray(sources * num_clips + clips)
    plan = plan_fn(jnp.asarray(gather_rows))
    assert plan.send_1.shape == (num_devices, num_devices, capacity_1)
    assert plan.send_2.shape == (num_devices, num_devices, capacity_2)
    assert plan.final.shape == (num_devices, clips_per_device)
    delivered = simulate_exchange(plan, num_devices, clips_per_device)
    np.testing.assert_array_equal(delivered.reshape(-1), gather_rows.reshape(-1))
    max_pair = max(max_pair, pair_counts(gather_rows, num_devices).max())
  # Round 1 sends exactly ceil(M / D) per pair, whatever the (uneven) direct counts.
  assert capacity_1 == -(-clips_per_device // num_devices)
  assert max_pair >= clips_per_device // num_devices


def test_exchange_capacities_and_auto_choice():
  assert montage.exchange_capacities(128, 8) == (16, 23)  # 8 GPUs x 32 videos x s=4
  assert montage.exchange_capacities(8, 4) == (2, 5)
  assert montage.exchange_capacities(4, 4) == (1, 4)  # never above M
  assert montage.choose_exchange("auto", 128, 8) == "all_to_all"  # 39 < 128 clips
  assert montage.choose_exchange("auto", 4, 4) == "all_gather"  # 1 + 4 >= 4
  assert montage.choose_exchange("auto", 64, 1) == "all_gather"  # one device: local
  assert montage.choose_exchange("all_to_all", 4, 4) == "all_to_all"
  with pytest.raises(ValueError, match="exchange='ring'"):
    montage.choose_exchange("ring", 8, 4)
