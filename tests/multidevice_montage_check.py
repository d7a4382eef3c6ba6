"""Runs the montage on 1 and 4 devices, with both exchanges, and prints a JSON report.

Needs 4 devices before jax starts, e.g.
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_montage_check.py
`tests/test_montage.py` runs it in a subprocess and checks the report.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from benchmarks.jax_step import collective_bytes
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


def run(mesh, videos, variant, aug_config, out_size, exchange, group_devices=0):
  fn = jax.jit(lambda v, k: montage.video_montage(
      v, k, mesh=mesh, num_clips=NUM_CLIPS, variant=variant, aug_config=aug_config,
      out_size=out_size, exchange=exchange, group_devices=group_devices))
  sharded = jax.device_put(videos, mesh_lib.batch_sharding(mesh))
  key = jax.random.key(42)
  compiled = fn.lower(sharded, key).compile()
  pseudo_videos, source_ids = compiled(sharded, key)
  shard_shapes = sorted({tuple(s.data.shape) for s in pseudo_videos.addressable_shards})
  collectives = collective_bytes(compiled.as_text())
  return np.asarray(pseudo_videos), np.asarray(source_ids), {
      "num_shards": len(pseudo_videos.addressable_shards),
      "shard_shapes": [list(s) for s in shard_shapes],
      "spec": str(pseudo_videos.sharding.spec),
      "collectives": {op: v for op, v in collectives.items() if v["count"]},
  }


def compare(reference, reference_ids, other, other_ids) -> dict:
  return {
      "ids_equal": bool(np.array_equal(reference_ids, other_ids)),
      "videos_equal": bool(np.array_equal(reference, other)),
      "max_abs_diff": float(np.abs(reference.astype(np.float64) - other).max()),
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
    single, single_ids, _ = run(one_device, videos, variant, config, out_size, "auto")
    by_exchange = {}
    # ('auto' picks all_to_all at these sizes: tests/test_montage.py checks the choice.)
    for exchange in ("all_to_all", "all_gather"):
      multi, multi_ids, layout = run(four_devices, videos, variant, config, out_size, exchange)
      by_exchange[exchange] = (multi, multi_ids)
      report[f"{name}/{exchange}"] = {
          # 4 devices against 1 device.
          **compare(single, single_ids, multi, multi_ids),
          "source_ids": multi_ids.tolist(),
          **layout,
      }
    # The two exchanges on the same 4 devices: the same clips reach the same program.
    report[f"{name}/all_to_all_vs_all_gather"] = compare(
        *by_exchange["all_gather"], *by_exchange["all_to_all"])
    if config is None:
      # Exact content on 4 devices: slot k of pseudo-video n is clip k of its source.
      for exchange, (multi, multi_ids) in by_exchange.items():
        frames = np.asarray(augment.denormalize_to_uint8(multi))
        clip_len = NUM_FRAMES // NUM_CLIPS
        expected = np.concatenate(
            [videos[multi_ids[:, k], k * clip_len:(k + 1) * clip_len]
             for k in range(NUM_CLIPS)], axis=1)
        report[f"{name}/{exchange}"]["content_exact"] = bool(np.array_equal(frames, expected))
  # Device groups: group_devices=4 is the default (one group); 2 and 1 shuffle within
  # pairs of devices / within each device.
  default, default_ids, _ = run(four_devices, random_videos, "C-A-S", aug_config, OUT_SIZE,
                                "auto")
  whole, whole_ids, _ = run(four_devices, random_videos, "C-A-S", aug_config, OUT_SIZE,
                            "auto", group_devices=4)
  report["groups/4_vs_default"] = compare(default, default_ids, whole, whole_ids)
  videos = id_videos()
  for group_devices in (2, 1):
    for exchange in ("all_to_all", "all_gather"):
      multi, multi_ids, layout = run(four_devices, videos, "C-A-S", None, SIZE, exchange,
                                     group_devices=group_devices)
      frames = np.asarray(augment.denormalize_to_uint8(multi))
      clip_len = NUM_FRAMES // NUM_CLIPS
      expected = np.concatenate([videos[multi_ids[:, k], k * clip_len:(k + 1) * clip_len]
                                 for k in range(NUM_CLIPS)], axis=1)
      report[f"groups/{group_devices}/{exchange}"] = {
          "source_ids": multi_ids.tolist(), "content_exact": bool(np.array_equal(frames,
                                                                                expected)),
          **layout}
  try:
    montage.video_montage(random_videos, jax.random.key(0), mesh=four_devices,
                          num_clips=NUM_CLIPS, aug_config=None, group_devices=3)
    report["bad_group_error"] = ""
  except ValueError as error:
    report["bad_group_error"] = str(error)
  try:
    montage.video_montage(random_videos[:6], jax.random.key(0), mesh=four_devices,
                          num_clips=NUM_CLIPS, aug_config=None)
    report["indivisible_batch_error"] = ""
  except ValueError as error:
    report["indivisible_batch_error"] = str(error)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
