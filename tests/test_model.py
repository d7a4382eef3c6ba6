"""TCVM model: output contract, segment cutting, validation, and the summary command."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from tcvm_jax import backbones, summary
from tcvm_jax import model as model_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def count_params(module: nnx.Module) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def jit_apply(module: nnx.Module, method=lambda module, x: module(x)):
  """method(module, x) compiled over the split state; returns (outputs, new state)."""
  graphdef, state = nnx.split(module)

  @jax.jit
  def forward(state, x):
    module = nnx.merge(graphdef, state)
    return method(module, x), nnx.state(module)

  return lambda x: forward(state, x)


@pytest.fixture(scope="module")
def demo_config():
  return pretrain.get_config("demo")


@pytest.fixture(scope="module")
def demo_model(demo_config):
  return model_lib.build_model(demo_config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pseudo_videos():
  # demo: 16 frames, 56x56 crops; 2 pseudo-videos.
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 56, 56, 3)), jnp.float32)


def test_demo_forward_shapes_dtypes_and_batch_stats(demo_model, pseudo_videos):
  demo_model.train()
  outputs, new_state = jit_apply(demo_model)(pseudo_videos)
  assert outputs["frame_features"].shape == (2, 16, 2, 2, 256)
  assert outputs["z_origin"].shape == (2, 4, 64) and outputs["z_origin"].dtype == jnp.float32
  assert outputs["z_diff"].shape == (2, 4, 256) and outputs["z_diff"].dtype == jnp.float32
  for value in outputs.values():
    assert np.all(np.isfinite(np.asarray(value)))
  # Train mode moves the BatchNorm running averages; eval mode leaves them alone.
  old_stats = jax.tree.leaves(nnx.state(demo_model, nnx.BatchStat))
  new_stats = jax.tree.leaves(nnx.state(new_state, nnx.BatchStat))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(old_stats, new_stats))
  demo_model.eval()
  _, eval_state = jit_apply(demo_model)(pseudo_videos)
  for a, b in zip(old_stats, jax.tree.leaves(nnx.state(eval_state, nnx.BatchStat))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_heads_see_consecutive_segments(demo_model, pseudo_videos):
  demo_model.eval()
  outputs, _ = jit_apply(demo_model)(pseudo_videos)
  frame_features = outputs["frame_features"]
  for clip in range(4):
    segment = frame_features[:, 4 * clip:4 * (clip + 1)]  # (B, L, h, w, C)
    np.testing.assert_allclose(np.asarray(outputs["z_diff"][:, clip]),
                               np.asarray(demo_model.tc_head(segment)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(outputs["z_origin"][:, clip]),
                               np.asarray(demo_model.ofc_head(segment)), rtol=1e-4, atol=1e-5)


def test_changing_one_clip_changes_only_its_embeddings(pseudo_videos):
  # A per-frame backbone (all temporal kernels 1), so that any cross-clip leak would come
  # from the segment cutting in the model, which is what this test checks.
  backbone = backbones.ResNet3D(stage_sizes=(1, 1, 1, 1), width=8,
                                stage_temporal_kernels=(1, 1, 1, 1),
                                zero_init_residual=False, rngs=nnx.Rngs(0))
  model = model_lib.TCVM(backbone, num_clips=4, num_frames=16, ofc_hidden_dim=32, ofc_dim=16,
                         rngs=nnx.Rngs(1))
  model.eval()
  changed_videos = pseudo_videos.at[1, 8:12].add(1.0)  # clip 2 of pseudo-video 1
  outputs, _ = jit_apply(model)(jnp.concatenate([pseudo_videos, changed_videos]))
  for key in ("z_diff", "z_origin"):
    delta = np.abs(np.asarray(outputs[key][2:] - outputs[key][:2])).max(axis=-1)  # (B, s)
    expected = np.zeros((2, 4), dtype=bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(delta > 1e-6, expected, err_msg=key)


def test_encode_pools_frame_features(demo_model, pseudo_videos):
  demo_model.eval()
  outputs, _ = jit_apply(demo_model)(pseudo_videos)
  encoded, _ = jit_apply(demo_model, lambda m, x: m.encode(x))(pseudo_videos)
  assert encoded.shape == (2, 256) and encoded.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(encoded),
                             np.asarray(outputs["frame_features"]).mean(axis=(1, 2, 3)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"data.num_frames": 18}, "data.num_frames.*montage.num_clips"),
    ({"montage.num_clips": 0}, "data.num_frames.*montage.num_clips"),
    ({"model.tc_k": 1.2}, "model.tc_k"),
    ({"model.backbone": "r2plus1d"}, "r3d50.*r3d_tiny.*tsm50.*tsm_tiny"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"data.num_frames": 12, "montage.num_clips": 4}, "divisible"),  # C=256, L=3
])
def test_build_model_validates_config(demo_config, overrides, message):
  config = demo_config.copy_and_resolve_references()
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))


def test_bn_axis_name_momentum_gradient_and_statistics_from_config(demo_config):
  config = demo_config.copy_and_resolve_references()
  config.model.bn_axis_name = "data"
  config.model.bn_momentum = 0.8
  config.model.bn_gradient = "closed_form"
  config.model.bn_statistics = "one_reduction"
  config.model.tc_hidden_dim = 48
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  assert len(norms) == 17 + 1  # backbone + TC head
  assert all(n.axis_name == "data" and n.momentum == 0.8 and n.gradient == "closed_form"
             and n.statistics == "one_reduction" for n in norms)
  assert model.tc_head.frame_fc.kernel.shape == (256, 48)
  assert model.tc_head.frame_projection.kernel.shape == (48, 256 // 4)


def test_full_size_r3d50_model(demo_config):
  config = pretrain.get_config()
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  assert count_params(model.backbone) == 31_634_496
  outputs = nnx.eval_shape(lambda m, x: m(x), model,
                           jax.ShapeDtypeStruct((2, 32, 112, 112, 3), jnp.float32))
  assert outputs["frame_features"].shape == (2, 32, 4, 4, 2048)
  assert outputs["z_diff"].shape == (2, 4, 2048)  # F_diff has dim C (Eq. 5)
  assert outputs["z_origin"].shape == (2, 4, 128)


def analytic_r3d50_macs(frames, size):
  """Dense multiply-adds of slow_r50 written out layer by layer (padded taps included)."""
  macs, width, in_features = 0, 64, 64
  h = (size + 2 * 3 - 7) // 2 + 1
  macs += frames * h * h * 3 * width * 7 * 7  # stem
  h = (h + 2 - 3) // 2 + 1  # max-pool
  for stage, (num_blocks, kt) in enumerate(zip((3, 4, 6, 3), (1, 1, 3, 3))):
    inner = width * 2**stage
    for block in range(num_blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      h_out = (h + 2 - 3) // stride + 1
      macs += frames * h * h * in_features * inner * kt  # conv_a (kt,1,1)
      macs += frames * h_out * h_out * inner * inner * 9  # conv_b (1,3,3)
      macs += frames * h_out * h_out * inner * 4 * inner  # conv_c
      if block == 0:
        macs += frames * h_out * h_out * in_features * 4 * inner  # projection shortcut
      h, in_features = h_out, 4 * inner
  return macs


def test_dense_macs_match_analytic_count_and_issue():
  backbone = nnx.eval_shape(lambda: backbones.get_backbone("r3d50", rngs=nnx.Rngs(0)))
  macs = summary.dense_macs(backbone, lambda b, x: b(x), (1, 32, 112, 112, 3))
  assert macs == analytic_r3d50_macs(32, 112)
  assert abs(macs / 1e9 - summary.REFERENCE_R3D50_GMACS) < 0.1  # issue: 44.0 GMACs


def test_summary_command_json(demo_config):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "tcvm_jax.summary", "--config=configs/pretrain.py:demo", "--json"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert {"backbone_params", "head_params", "gflops_per_clip"} <= report.keys()
  model = nnx.eval_shape(lambda: model_lib.build_model(demo_config, rngs=nnx.Rngs(0)))
  assert report["backbone_params"] == count_params(model.backbone)
  assert report["head_params"] == count_params(model.tc_head) + count_params(model.ofc_head)
  assert report["params_by_module"]["backbone"] == report["backbone_params"]
  assert sum(report["params_by_module"][f"backbone.stages[{i}]"] for i in range(4)) + \
      report["params_by_module"]["backbone.stem"] == report["backbone_params"]
  # XLA's count excludes taps on padding, so it sits a little below 2 x dense MACs.
  dense_gflops = 2 * report["backbone_dense_gmacs_per_clip"]
  assert 0.8 * dense_gflops < report["backbone_gflops_per_clip"] <= 1.05 * dense_gflops
  assert report["gflops_per_clip"] > report["backbone_gflops_per_clip"]
