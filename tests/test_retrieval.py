"""Retrieval: blockwise top-k vs NumPy brute force, per-video averaging, the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from configs import retrieval as retrieval_config
from tcvm_jax import checkpointing
from tcvm_jax import config_validation
from tcvm_jax import retrieval
from tcvm_jax.data import synthetic
from tcvm_jax.model import build_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Generated once per machine (fingerprint-checked, safe under concurrent runs).
TINY_DATA_DIR = os.path.join(tempfile.gettempdir(), "tcvm_jax_test_data", "synthetic_tiny")


def brute_force_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest dot products per query; ties -> lower index (stable sort)."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def brute_force_accuracy(neighbours: np.ndarray, gallery_labels: np.ndarray,
                         query_labels: np.ndarray, k: int) -> float:
  correct = 0
  for query, row in enumerate(neighbours):
    if any(gallery_labels[g] == query_labels[query] for g in row[:k]):
      correct += 1
  return correct / len(neighbours)


@pytest.mark.parametrize("num_queries,num_gallery,block_size,query_block_size,k", [
    (13, 37, 8, 5, 10),     # neither size is a multiple of its block
    (4, 23, 23, 64, 23),    # one gallery block, k = the whole gallery
    (9, 50, 7, 9, 1),
])
def test_nearest_neighbours_match_numpy_brute_force(num_queries, num_gallery, block_size,
                                                     query_block_size, k):
  rng = np.random.default_rng(num_gallery)
  queries = retrieval.l2_normalize(rng.normal(size=(num_queries, 16)).astype(np.float32))
  gallery = retrieval.l2_normalize(rng.normal(size=(num_gallery, 16)).astype(np.float32))
  scores, indices = retrieval.nearest_neighbours(
      queries, gallery, k, block_size=block_size, query_block_size=query_block_size)
  expected = brute_force_neighbours(queries, gallery, k)
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ gallery.T, expected, 1),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_topk_accuracy_matches_brute_force_including_block_boundaries():
  rng = np.random.default_rng(1)
  num_classes = 6
  gallery_labels = rng.integers(0, num_classes, 101)
  query_labels = rng.integers(0, num_classes, 29)
  # Class-dependent features so that accuracies are neither 0 nor 1.
  centres = rng.normal(size=(num_classes, 8))
  gallery = centres[gallery_labels] + 1.5 * rng.normal(size=(101, 8))
  queries = centres[query_labels] + 1.5 * rng.normal(size=(29, 8))
  gallery, queries = retrieval.l2_normalize(gallery), retrieval.l2_normalize(queries)
  _, neighbours = retrieval.nearest_neighbours(queries, gallery, 10, block_size=16,
                                               query_block_size=8)
  accuracy = retrieval.topk_accuracy(gallery_labels[neighbours], query_labels, (1, 5, 10))
  reference = brute_force_neighbours(queries, gallery, 10)
  for k in (1, 5, 10):
    assert accuracy[f"top{k}"] == pytest.approx(
        brute_force_accuracy(reference, gallery_labels, query_labels, k))
  assert 0 < accuracy["top1"] <= accuracy["top5"] <= accuracy["top10"] < 1


def test_exact_ties_across_blocks_prefer_the_lower_gallery_index():
  rng = np.random.default_rng(2)
  base = retrieval.l2_normalize(rng.normal(size=(5, 8)).astype(np.float32))
  gallery = np.concatenate([base, base, base[:2]])  # copies straddle blocks of 3
  queries = base[[0, 3]]
  _, indices = retrieval.nearest_neighbours(queries, gallery, 3, block_size=3)
  # Each query's own copies (cosine 1) come first, in gallery order.
  np.testing.assert_array_equal(indices[0], [0, 5, 10])
  np.testing.assert_array_equal(indices[1, :2], [3, 8])
  np.testing.assert_array_equal(indices, brute_force_neighbours(queries, gallery, 3))


def test_gallery_of_twelve_thousand_videos_fits_in_blocks():
  rng = np.random.default_rng(3)
  gallery = retrieval.l2_normalize(rng.normal(size=(12_000, 32)).astype(np.float32))
  queries = retrieval.l2_normalize(rng.normal(size=(40, 32)).astype(np.float32))
  _, indices = retrieval.nearest_neighbours(queries, gallery, 10, block_size=1024)
  np.testing.assert_array_equal(indices, brute_force_neighbours(queries, gallery, 10))


def test_nearest_neighbours_rejects_bad_arguments():
  gallery = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"k=5 must be in \[1, gallery size=4\]"):
    retrieval.nearest_neighbours(np.ones((2, 3)), gallery, 5)
  with pytest.raises(ValueError, match="must share C"):
    retrieval.nearest_neighbours(np.ones((2, 2)), gallery, 1)


def test_per_video_mean_groups_views_across_batches_and_ignores_padding():
  rng = np.random.default_rng(4)
  num_videos, num_views = 7, 6
  video_ids = np.array([5 * 2**32 + 3, 17, 0, 2**32, 9, 4, 2**33 + 1], np.int64)  # sparse ids
  labels = rng.integers(0, 3, num_videos)
  values = rng.normal(size=(num_videos, num_views, 5))
  order = rng.permutation(num_videos * num_views)  # views arrive in any order
  accumulator = retrieval.PerVideoMean()
  for start in range(0, order.size, 8):
    rows = order[start:start + 8]
    batch_values = values.reshape(-1, 5)[rows]
    batch_ids = video_ids[rows // num_views]
    batch_labels = labels[rows // num_views]
    pad = 8 - rows.size  # the eval pipeline pads its last batch with mask False
    accumulator.add(np.concatenate([batch_values, np.full((pad, 5), 1e6)]),
                    np.concatenate([batch_ids, -np.ones(pad, np.int64)]),
                    np.concatenate([batch_labels, -np.ones(pad, np.int64)]),
                    np.concatenate([np.ones(rows.size, bool), np.zeros(pad, bool)]))
  outputs = accumulator.result(expected_views=num_views)
  sort = np.argsort(video_ids)
  np.testing.assert_array_equal(outputs.video_index, video_ids[sort])
  np.testing.assert_allclose(outputs.values, values.mean(axis=1)[sort], rtol=1e-6)
  np.testing.assert_array_equal(outputs.labels, labels[sort])
  np.testing.assert_array_equal(outputs.num_views, num_views)
  with pytest.raises(ValueError, match="other than 5"):
    accumulator.result(expected_views=5)


def test_view_meta_round_trips_64_bit_video_indices():
  batch = {"video_index": np.array([-1, 0, 3 * 2**32 + 7, 2**40 - 1], np.int64),
           "label": np.array([-1, 2, 0, 173], np.int32),
           "mask": np.array([False, True, True, True])}
  meta = retrieval.pack_view_meta(batch)
  assert meta.dtype == np.int32
  video_index, labels, mask = retrieval.unpack_view_meta(meta)
  np.testing.assert_array_equal(video_index, batch["video_index"])
  np.testing.assert_array_equal(labels, batch["label"])
  np.testing.assert_array_equal(mask, batch["mask"])


def test_config_errors_name_the_setting():
  config = retrieval_config.get_config("ucf101")
  with pytest.raises(config_validation.ConfigError, match="init_checkpoint"):
    retrieval.validate_config(config)
  config.init_checkpoint = "somewhere"
  config.retrieval.ks = (5, 1)
  with pytest.raises(config_validation.ConfigError, match=r"config\.retrieval\.ks"):
    retrieval.validate_config(config)
  config.retrieval.ks = (1, 5)
  config.retrieval.query_split = "train"
  with pytest.raises(config_validation.ConfigError, match=r"query_split='train'"):
    retrieval.validate_config(config)
  config.retrieval.query_split = "test"
  config.retrieval.num_crops = 2
  with pytest.raises(config_validation.ConfigError, match=r"config\.retrieval\.num_crops=2"):
    retrieval.validate_config(config)
  # 'auto' needs a checkpoint to take the architecture from.
  with pytest.raises(config_validation.ConfigError, match=r"config\.model\.backbone='auto'"):
    retrieval.resolve_encoder(config, retrieval.RANDOM_INIT)


def export_tiny_encoder(directory: str, seed: int) -> checkpointing.EncoderCheckpoint:
  """A pretraining-style export of the demo TCVM (r3d_tiny) with non-trivial BN statistics."""
  config = pretrain.get_config("demo")
  params, batch_stats = jax.jit(lambda: nnx.split(
      build_model(config, rngs=nnx.Rngs(seed)), nnx.Param, nnx.BatchStat)[1:])()
  batch_stats = jax.tree.map(lambda x: x + 0.1 * (seed + 1), batch_stats)
  checkpointing.save_encoder(os.path.join(directory, checkpointing.ENCODER_DIRNAME), params,
                             batch_stats, config)
  return checkpointing.load_encoder(directory)


def test_demo_preset_end_to_end_with_random_baseline(tmp_path):
  pretrain_dir = str(tmp_path / "pretrain")
  export_tiny_encoder(pretrain_dir, seed=3)
  config = retrieval_config.get_config("demo")
  config.init_checkpoint = pretrain_dir
  config.data.synthetic_dir = TINY_DATA_DIR
  config.data.synthetic_params = synthetic.TINY_PARAMS
  config.retrieval.num_clips = 2
  config.retrieval.block_size = 16  # 40 gallery videos: blocks of 16, 16, 8
  workdir = tmp_path / "retrieval"
  results = retrieval.run(config, str(workdir))

  with open(workdir / "results.json") as f:
    stored = json.load(f)
  assert [row["encoder"] for row in stored["rows"]] == [os.path.abspath(pretrain_dir),
                                                       "random"]
  for row in stored["rows"]:
    # TINY_PARAMS: 20 test queries against 40 train videos.
    assert (row["num_queries"], row["num_gallery"]) == (20, 40)
    assert 0.0 <= row["top1"] <= row["top5"] <= row["top10"] <= 1.0
    # Accuracies are counts of 20 queries.
    assert all(abs(row[f"top{k}"] * 20 - round(row[f"top{k}"] * 20)) < 1e-9 for k in (1, 5, 10))
  for k in ("top1", "top5", "top10"):
    assert stored[k] == stored["rows"][0][k] == results[k]
  protocol = stored["protocol"]
  assert protocol["num_clips"] == 2 and protocol["similarity"] == "cosine"
  assert protocol["query_split"] == "test" and protocol["gallery_split"] == "train"
  assert protocol["backbone"] == "r3d_tiny"
  table = (workdir / "results.md").read_text()
  assert "| random |" in table and "top-10" in table


_MULTI_DEVICE_CODE = r"""
import numpy as np, jax
from tcvm_jax import retrieval, mesh as mesh_lib
assert jax.device_count() == 4, jax.devices()
mesh = mesh_lib.create_mesh()
rng = np.random.default_rng(0)
queries, gallery = rng.normal(size=(10, 12)), rng.normal(size=(45, 12))
_, indices = retrieval.nearest_neighbours(queries, gallery, 7, block_size=10,
                                          query_block_size=6, mesh=mesh)
reference = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :7]
assert (indices == reference).all(), (indices, reference)

# Views sharded over 4 devices; every process sees the global batch's outputs.
runner = retrieval.make_view_runner(
    lambda state, videos: videos.astype(np.float32).mean(axis=(1, 2, 3)) * state, mesh)
videos = rng.integers(0, 256, size=(8, 2, 4, 4, 3), dtype=np.uint8)
batch = {"video": videos, "video_index": np.array([7, 7, 2**33, 2**33, 5, 5, -1, -1]),
         "label": np.array([1, 1, 0, 0, 2, 2, -1, -1]), "mask": np.arange(8) < 6}
outputs = retrieval.average_over_views(runner, np.float32(2.0), [batch], expected_views=2)
expected = 2.0 * videos.astype(np.float64).mean(axis=(1, 2, 3))
assert list(outputs.video_index) == [5, 7, 2**33]
np.testing.assert_allclose(outputs.values,
                           [expected[4:6].mean(0), expected[0:2].mean(0), expected[2:4].mean(0)],
                           rtol=1e-5)
print("MULTI_DEVICE_OK")
"""


def test_blockwise_topk_and_view_runner_on_four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  process = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_CODE], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  assert "MULTI_DEVICE_OK" in process.stdout
