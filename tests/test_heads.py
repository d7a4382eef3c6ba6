"""TC and OFC heads against NumPy brute force (Eq. 4-5) and their invariants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tcvm_jax import heads


def numpy_temporal_difference(x, k, second_order=False):
  """Eq. 4 written out frame by frame; x_{L+1} := x_L (last frame repeated)."""
  num_clips, length, channels = x.shape[0], x.shape[1], x.shape[-1]
  num_diff = math.floor(k * channels)

  def difference(features):
    out = np.empty_like(features)
    for n in range(num_clips):
      for i in range(length):
        next_frame = features[n, i + 1] if i + 1 < length else features[n, length - 1]
        out[n, i] = features[n, i] - next_frame
    return out

  d = x.copy()
  d[..., :num_diff] = difference(x[..., :num_diff])
  if second_order:
    d[..., :num_diff] = difference(d[..., :num_diff])
  return d


@pytest.mark.parametrize("k", [0.0, 0.25, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 2, 2, 8), (2, 5, 10)])
def test_temporal_difference_matches_numpy(k, second_order, shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  result = np.asarray(heads.temporal_difference(jnp.asarray(x), k, second_order))
  np.testing.assert_allclose(result, numpy_temporal_difference(x, k, second_order),
                             rtol=1e-6, atol=1e-6)


def test_temporal_difference_edge_cases():
  x = np.random.default_rng(1).normal(size=(2, 4, 3, 3, 8)).astype(np.float32)
  # k=0: nothing changes; k=1: every channel is a difference.
  np.testing.assert_array_equal(np.asarray(heads.temporal_difference(jnp.asarray(x), 0.0)), x)
  all_diff = np.asarray(heads.temporal_difference(jnp.asarray(x), 1.0))
  np.testing.assert_allclose(all_diff[:, :-1], x[:, :-1] - x[:, 1:], atol=1e-6)
  # Last frame: difference channels are exactly zero, appearance channels are x_L.
  half = np.asarray(heads.temporal_difference(jnp.asarray(x), 0.5))
  assert np.all(half[:, -1, ..., :4] == 0)
  np.testing.assert_array_equal(half[:, -1, ..., 4:], x[:, -1, ..., 4:])
  # Per clip: clip 1 does not see clip 0 (no difference across a clip boundary).
  changed = x.copy()
  changed[0] += 5.0
  np.testing.assert_array_equal(
      np.asarray(heads.temporal_difference(jnp.asarray(changed), 1.0))[1], all_diff[1])


@pytest.mark.parametrize("bad_k", [-0.1, 1.5])
def test_bad_k_raises_naming_the_setting(bad_k):
  with pytest.raises(ValueError, match="model.tc_k"):
    heads.temporal_difference(jnp.zeros((1, 2, 4)), bad_k)
  with pytest.raises(ValueError, match="model.tc_k"):
    heads.TCHead(8, 2, k=bad_k, rngs=nnx.Rngs(0))


def test_tc_head_requires_c_divisible_by_l():
  with pytest.raises(ValueError, match="divisible"):
    heads.TCHead(10, 4, rngs=nnx.Rngs(0))


def numpy_tc_head(head, segment_features, use_batch_stats):
  """Eq. 4-5 with the head's parameters: diff -> pool -> FC -> BN -> ReLU -> f -> concat."""
  num_clips, length = segment_features.shape[:2]
  d = numpy_temporal_difference(segment_features, head.k, head.second_order)
  frame_vectors = d.mean(axis=(2, 3)).reshape(num_clips * length, -1)
  hidden = frame_vectors @ np.asarray(head.frame_fc.kernel[...])
  bn = head.frame_bn
  if use_batch_stats:  # statistics over all N*L frames
    mean, var = hidden.mean(axis=0), hidden.var(axis=0)
  else:
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  hidden = (hidden - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(
      bn.bias[...])
  hidden = np.maximum(hidden, 0)
  projection = head.frame_projection
  per_frame = hidden @ np.asarray(projection.kernel[...]) + np.asarray(projection.bias[...])
  return per_frame.reshape(num_clips, length * per_frame.shape[-1]), mean, var


@pytest.fixture(scope="module")
def segment_features():
  return np.random.default_rng(2).normal(size=(6, 4, 2, 2, 32)).astype(np.float32)


@pytest.mark.parametrize("second_order", [False, True])
def test_tc_head_matches_numpy_train_and_eval(segment_features, second_order):
  head = heads.TCHead(32, 4, k=0.5, second_order=second_order, hidden_dim=16,
                      rngs=nnx.Rngs(0))
  # Non-trivial BN affine parameters and running statistics.
  rng = np.random.default_rng(3)
  head.frame_bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  head.frame_bn.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  head.frame_bn.mean[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  head.frame_bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)

  head.eval()
  expected, _, _ = numpy_tc_head(head, segment_features, use_batch_stats=False)
  f_diff = head(jnp.asarray(segment_features))
  assert f_diff.shape == (6, 32) and f_diff.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(f_diff), expected, rtol=1e-4, atol=1e-4)

  head.train()
  old_mean = np.asarray(head.frame_bn.mean[...])
  expected, batch_mean, _ = numpy_tc_head(head, segment_features, use_batch_stats=True)
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(segment_features))), expected,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(head.frame_bn.mean[...]),
                             0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-5)


def test_tc_head_is_ordered_in_time(segment_features):
  head = heads.TCHead(32, 4, k=0.5, rngs=nnx.Rngs(0))
  head.eval()
  f_diff = np.asarray(head(jnp.asarray(segment_features)))
  reversed_f_diff = np.asarray(head(jnp.asarray(segment_features[:, ::-1])))
  assert np.abs(f_diff - reversed_f_diff).max() > 1e-3  # unlike temporal pooling

  # Changing frame j only touches d_{j-1} and d_j, i.e. the (C/L)-chunks j-1 and j of
  # F_diff, and only for that clip.
  changed = segment_features.copy()
  changed[1, 2] += 1.0
  delta = np.abs(np.asarray(head(jnp.asarray(changed))) - f_diff).reshape(6, 4, 8).max(-1)
  expected = np.zeros((6, 4), dtype=bool)
  expected[1, 1:3] = True
  np.testing.assert_array_equal(delta > 1e-6, expected)


def test_heads_compute_in_bfloat16_return_float32(segment_features):
  tc_head = heads.TCHead(32, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ofc_head = heads.OFCHead(32, hidden_dim=16, output_dim=8, dtype="bfloat16",
                           rngs=nnx.Rngs(0))
  assert tc_head(jnp.asarray(segment_features)).dtype == jnp.float32
  assert ofc_head(jnp.asarray(segment_features)).dtype == jnp.float32
  param_dtypes = {leaf.dtype for module in (tc_head, ofc_head)
                  for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))}
  assert param_dtypes == {np.dtype(np.float32)}


def test_ofc_head_matches_numpy(segment_features):
  head = heads.OFCHead(32, hidden_dim=16, output_dim=8, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(4)
  head.hidden.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  head.output.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
  pooled = segment_features.mean(axis=(1, 2, 3))
  hidden = np.maximum(pooled @ np.asarray(head.hidden.kernel[...])
                      + np.asarray(head.hidden.bias[...]), 0)
  expected = hidden @ np.asarray(head.output.kernel[...]) + np.asarray(head.output.bias[...])
  z_origin = head(jnp.asarray(segment_features))
  assert z_origin.shape == (6, 8) and z_origin.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(z_origin), expected, rtol=1e-4, atol=1e-4)
