"""The stem in the 4x4-block layout (tcvm_jax/stem.py) against the strided pixel ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from tcvm_jax import backbones, config_validation, stem
from train_test_utils import reduce_window_max_pool


def strided_conv(x, kernel):
  """The reference: XLA's stride-2 conv with PyTorch padding (k // 2)."""
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kernel_size, height, width", [(7, 16, 20), (7, 8, 8), (3, 12, 8),
                                                        (5, 8, 12)])
def test_conv_blocks_equals_strided_conv(kernel_size, height, width):
  x = random((3, height, width, 3), 0)
  kernel = random((kernel_size, kernel_size, 3, 5), 1)
  blocks = stem.conv_blocks(x, kernel)
  assert blocks.shape == (3, height // 4, width // 4, 2, 2, 5)
  np.testing.assert_allclose(np.asarray(stem.pixels_from_blocks(blocks)),
                             np.asarray(strided_conv(x, kernel)), rtol=1e-5, atol=1e-5)


def test_block_kernel_places_every_tap_once():
  # Each (output pixel, kernel tap) pair sits at exactly one (block, input pixel): the
  # block kernel holds every weight 4 times (once per output pixel of a block) and zeros.
  kernel = jnp.arange(1.0, 7 * 7 * 2 * 3 + 1).reshape(7, 7, 2, 3)
  blocks = np.asarray(stem.block_kernel(kernel))
  assert blocks.shape == (3, 3, 16 * 2, 4 * 3)  # 432 inputs per output value for 7x7x3
  values, counts = np.unique(blocks[blocks != 0], return_counts=True)
  np.testing.assert_array_equal(values, np.arange(1.0, kernel.size + 1))
  assert np.all(counts == 4)


@pytest.mark.parametrize("gradient", ["stack", "select", "auto"])
def test_max_pool_blocks_values_and_gradient_match_reduce_window(gradient):
  # Distinct values (a shuffled ramp): no ties, so the gradient is unique.
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 2, 2, 5)
  y = jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32) / 7.0)
  pooled = stem.max_pool_blocks(y, gradient)
  expected = reduce_window_max_pool(stem.pixels_from_blocks(y))
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(expected))
  cotangent = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(stem.max_pool_blocks(v, gradient) * cotangent)))(y)
  grad_reference = jax.grad(lambda v: jnp.sum(reduce_window_max_pool(v) * cotangent))(
      stem.pixels_from_blocks(y))
  np.testing.assert_allclose(np.asarray(stem.pixels_from_blocks(grad)),
                             np.asarray(grad_reference), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", ["stack", "select"])
def test_max_pool_blocks_gradient_on_ties_goes_to_first_maximum_once(gradient):
  y = jnp.zeros((1, 2, 2, 2, 2, 1))  # 4x4 pixels, all equal
  grad = jax.grad(lambda v: jnp.sum(stem.max_pool_blocks(v, gradient)))(y)
  reference = jax.grad(lambda v: jnp.sum(reduce_window_max_pool(v)))(jnp.zeros((1, 4, 4, 1)))
  np.testing.assert_array_equal(np.asarray(stem.pixels_from_blocks(grad)),
                                np.asarray(reference))
  assert float(grad.sum()) == 4  # 2x2 outputs, each gradient 1, none lost or duplicated


def test_max_pool_blocks_gradient_forms_agree_exactly_and_compile_differently():
  # bfloat16 values with many ties (small integers): both assemblies route every output's
  # gradient to the same pixel, bit for bit; the 'select' form has no concatenate.
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.integers(0, 4, size=(3, 5, 6, 2, 2, 8)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=(3, 5, 6, 8)), jnp.bfloat16)
  programs, grads = {}, {}
  for gradient in ("stack", "select"):
    fn = jax.jit(jax.grad(lambda v, g=gradient: jnp.sum(
        stem.max_pool_blocks(v, g).astype(jnp.float32) * cotangent)))
    programs[gradient] = fn.lower(y).as_text()
    grads[gradient] = np.asarray(fn(y), np.float32)
  np.testing.assert_array_equal(grads["select"], grads["stack"])
  assert "concatenate" in programs["stack"] and "concatenate" not in programs["select"]


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="multiples of 4"):
    stem.conv_blocks(jnp.zeros((1, 10, 8, 3)), jnp.zeros((7, 7, 3, 4)))
  with pytest.raises(ValueError, match="block layout"):
    stem.max_pool_blocks(jnp.zeros((1, 2, 2, 4)))


def make_backbone(layout, dtype=jnp.float32):
  return backbones.get_backbone("r3d_tiny", dtype=dtype, stem_layout=layout,
                                rngs=nnx.Rngs(0))


def test_stem_blocks_layout_matches_pixels_in_training():
  # Same parameters (same seed): the same pooled output, parameter gradients and
  # BatchNorm statistics whichever layout the stem computes in.
  videos = random((2, 4, 32, 32, 3), 2)
  # 'auto' (per-platform conv and pool around one BatchNorm over rows) too, under jit.
  results = {}
  for layout in ("pixels", "blocks", "auto"):
    backbone = make_backbone(layout)
    loss_fn = lambda m: jnp.sum(m._stem(videos) ** 2)  # pylint: disable=protected-access
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(backbone)
    results[layout] = (loss, grads, backbone.stem_bn.mean[...], backbone.stem_bn.var[...])
  loss_p, grads_p, mean_p, var_p = results["pixels"]
  for layout in ("blocks", "auto"):
    loss_b, grads_b, mean_b, var_b = results[layout]
    np.testing.assert_allclose(float(loss_b), float(loss_p), rtol=1e-5)
    stem_grads = 0
    for p, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_b)):
      scale = float(jnp.abs(p).max())
      stem_grads += scale > 0  # the stem's conv kernel, BN scale and bias
      np.testing.assert_allclose(np.asarray(b) / (scale + 1e-12),
                                 np.asarray(p) / (scale + 1e-12), atol=1e-5)
    assert stem_grads == 3, layout
    # The running statistics moved, and alike.
    assert float(jnp.abs(mean_b).max()) > 0, layout
    np.testing.assert_allclose(np.asarray(mean_b), np.asarray(mean_p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var_b), np.asarray(var_p), rtol=1e-5, atol=1e-6)


def test_backbone_with_blocks_stem_matches_pixels():
  # The whole backbone (bfloat16, evaluation mode): same features; frame sides that are
  # not multiples of 4 take the pixel layout, the same program.
  features = {}
  for layout in ("pixels", "blocks", "auto"):
    backbone = make_backbone(layout, jnp.bfloat16)
    backbone.eval()
    run = jax.jit(lambda videos, backbone=backbone: backbone(videos))
    features[layout] = [np.asarray(run(random(shape, 3)), np.float32)
                        for shape in ((1, 2, 32, 32, 3), (1, 2, 30, 34, 3))]
  (pixels, pixels_odd), (blocks, blocks_odd), (auto, auto_odd) = features.values()
  np.testing.assert_allclose(blocks, pixels, rtol=0.05, atol=0.05)
  np.testing.assert_array_equal(blocks_odd, pixels_odd)
  np.testing.assert_allclose(auto, pixels, rtol=0.05, atol=0.05)  # pixels on this CPU
  np.testing.assert_array_equal(auto_odd, pixels_odd)


def test_stem_layout_is_validated():
  with pytest.raises(ValueError, match="stem_layout"):
    make_backbone("columns")
  config = pretrain.get_config("demo")
  config.model.stem_layout = "columns"
  with pytest.raises(config_validation.ConfigError, match="stem_layout"):
    config_validation.validate_config(config, num_devices=1, check_paths=False,
                                      check_model=False)
  with pytest.raises(ValueError, match="stem_pool_gradient"):
    backbones.get_backbone("r3d_tiny", stem_pool_gradient="gather", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="stem_pool_gradient"):
    stem.max_pool_blocks(jnp.zeros((1, 2, 2, 2, 2, 1)), "gather")
  config = pretrain.get_config("demo")
  config.model.stem_pool_gradient = "gather"
  with pytest.raises(config_validation.ConfigError, match="stem_pool_gradient"):
    config_validation.validate_config(config, num_devices=1, check_paths=False,
                                      check_model=False)
