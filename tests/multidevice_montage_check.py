"""Runs the montage on a 1-device and a 4-device mesh and prints a JSON report.

Needs 4 devices before jax starts, e.g.
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_montage_check.py
`tests/test_montage.py` runs it in a subprocess and checks the report.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from configs.pretrain import get_config
from tcvm_jax import augment, mesh as mesh_lib, montage

NUM_VIDEOS, NUM_FRAMES, SIZE, NUM_CLIPS, OUT_SIZE = 8, 8, 16, 4, 12


def id_videos() -> np.ndarray:
  """Pixels encode (video, frame, position): channel 0 = video, 1 = frame, 2 = position."""
  videos = np.zeros((NUM_VIDEOS, NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
  videos[..., 0] = np.arange(NUM_VIDEOS)[:, None, None, None] * 7
  videos[..., 1] = np.arange(NUM_FRAMES)[None, :, None, None] * 11
  videos[..., 2] = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 3) % 256
  return videos


def run(mesh, videos, variant, aug_config, out_size):
  fn = jax.jit(lambda v, k: montage.video_montage(
      v, k, mesh=mesh, num_clips=NUM_CLIPS, variant=variant, aug_config=aug_config,
      out_size=out_size))
  pseudo_videos, source_ids = fn(jax.device_put(videos, mesh_lib.batch_sharding(mesh)),
                                 jax.random.key(42))
  shard_shapes = sorted({tuple(s.data.shape) for s in pseudo_videos.addressable_shards})
  return np.asarray(pseudo_videos), np.asarray(source_ids), {
      "num_shards": len(pseudo_videos.addressable_shards),
      "shard_shapes": [list(s) for s in shard_shapes],
      "spec": str(pseudo_videos.sharding.spec),
  }


def main() -> None:
  if jax.device_count() != 4:
    sys.exit(f"need 4 devices, found {jax.device_count()}")
  one_device = mesh_lib.create_mesh(jax.devices()[:1])
  four_devices = mesh_lib.create_mesh(jax.devices())
  aug_config = get_config().augment
  random_videos = np.random.RandomState(0).randint(
      0, 256, (NUM_VIDEOS, NUM_FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
  report = {}
  cases = {"C-A-S/aug": ("C-A-S", aug_config, OUT_SIZE, random_videos),
           "C-A-S/noaug": ("C-A-S", None, SIZE, id_videos())}
  for name, (variant, config, out_size, videos) in cases.items():
    single, single_ids, _ = run(one_device, videos, variant, config, out_size)
    multi, multi_ids, layout = run(four_devices, videos, variant, config, out_size)
    report[name] = {
        "ids_equal": bool(np.array_equal(single_ids, multi_ids)),
        "videos_equal": bool(np.array_equal(single, multi)),
        "max_abs_diff": float(np.abs(single.astype(np.float64) - multi).max()),
        "source_ids": multi_ids.tolist(),
        **layout,
    }
    if config is None:
      # Exact content on 4 devices: slot k of pseudo-video n is clip k of its source.
      frames = np.asarray(augment.denormalize_to_uint8(multi))
      clip_len = NUM_FRAMES // NUM_CLIPS
      expected = np.concatenate(
          [videos[multi_ids[:, k], k * clip_len:(k + 1) * clip_len] for k in range(NUM_CLIPS)],
          axis=1)
      report[name]["content_exact"] = bool(np.array_equal(frames, expected))
  try:
    montage.video_montage(random_videos[:6], jax.random.key(0), mesh=four_devices,
                          num_clips=NUM_CLIPS, aug_config=None)
    report["indivisible_batch_error"] = ""
  except ValueError as error:
    report["indivisible_batch_error"] = str(error)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
