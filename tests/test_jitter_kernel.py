"""The fused colour-jitter kernel (Pallas, run by its interpreter on this CPU) against the
XLA form and the one-op-after-another references of test_augment."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from tcvm_jax import augment, colour, jitter_kernel, mesh as mesh_lib, montage

ORDERS = list(itertools.permutations(range(4)))


def random_planes(seed: int, shape) -> jax.Array:
  """RGB planes (3, *shape) in [0, 1]."""
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(3, *shape)), jnp.float32)


def reference(planes, brightness, contrast, saturation, hue, order, jitter, grayscale):
  """The public channels-last ops, one after another in `order`, then grayscale."""
  images = jnp.moveaxis(planes, 0, -1)
  ops = [lambda x: augment.adjust_brightness(x, brightness),
         lambda x: augment.adjust_contrast(x, contrast),
         lambda x: augment.adjust_saturation(x, saturation),
         lambda x: augment.adjust_hue(x, hue)]
  if jitter:
    for op in order:
      images = ops[op](images)
  if grayscale:
    images = augment.grayscale(images)
  return jnp.moveaxis(images, -1, 0)


@pytest.mark.parametrize("jitter,grayscale", [(True, False), (False, True), (True, True)])
def test_every_order_matches_the_ops_one_after_another(jitter, grayscale):
  # 3 frames of 33 x 37 = 1221 pixels: a full chunk of 1024 and a masked partial one.
  planes = random_planes(0, (3, 33, 37))
  factors = dict(brightness=1.3, contrast=0.7, saturation=1.35, hue=0.08)

  @jax.jit
  def fused(order):
    row = jitter_kernel.frame_params(order=order, jitter=jitter, grayscale=grayscale,
                                     **factors)
    return jitter_kernel.jitter_gray_frames(planes, jnp.tile(row, (3, 1)), interpret=True)

  outputs = []
  for order in ORDERS:
    # The reference's ops are picked in Python: its order is static, the kernel's is data.
    want = reference(planes, order=order, jitter=jitter, grayscale=grayscale, **factors)
    got = fused(jnp.asarray(order))
    assert got.shape == planes.shape and got.dtype == planes.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    outputs.append(np.asarray(got))
  if jitter and not grayscale:
    assert not np.allclose(outputs[0], outputs[-1], atol=1e-3)  # the order matters here
  if not jitter:
    gray = np.asarray(colour.gray_plane(tuple(planes)))
    np.testing.assert_allclose(outputs[0], np.stack([gray] * 3), atol=1e-6)


def test_contrast_slot_is_the_active_contrast():
  # Brute force over the 24 orders: the blend ops in their relative order fill slots 0-2
  # before the hue and 3-5 after it; contrast's slot is its rank among the blend ops,
  # plus 3 if it comes after the hue.
  for order in ORDERS:
    blends = [op for op in order if op != colour.HUE_OP]
    expected = blends.index(1) + 3 * (order.index(1) > order.index(colour.HUE_OP))
    ops, factors = colour.jitter_slots(1.1, 0.7, 1.3, jnp.asarray(order))
    assert int(colour.contrast_slot(ops, jnp.asarray(order))) == expected, order
    assert np.asarray(ops).tolist() == blends
    assert float(factors[expected]) == pytest.approx(0.7)
    assert np.sum(np.asarray(factors) != 1.0) == 3  # each blend op active in one slot


def test_the_augmentation_with_the_kernel_equals_the_xla_form(monkeypatch):
  # Through augment_clips (vmapped over clips: the kernel's batching rule), with jitter
  # and grayscale on and off across clips; float32 planes agree to rounding.
  monkeypatch.setattr(augment, "_INTERPRET_KERNEL_OFF_CUDA", True)
  config = get_config("demo").augment
  clips = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, 3, 40, 48, 3)),
                      jnp.uint8)
  params = jax.vmap(lambda key: augment.sample_augment_params(key, config, (40, 48), 32))(
      jax.random.split(jax.random.key(1), 6))
  params = dataclasses.replace(params, jitter=jnp.arange(6) % 2 == 0,
                               grayscale=jnp.arange(6) % 3 == 0)
  run = {kernel: jax.jit(lambda p, c, planes, kernel=kernel: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions(planes, "taps", kernel)), static_argnums=2)
         for kernel in ("xla", "pallas")}
  xla = np.asarray(run["xla"](params, clips, "float32"))
  np.testing.assert_allclose(np.asarray(run["pallas"](params, clips, "float32")), xla,
                             atol=2e-5)
  # bfloat16 planes: the kernel rounds once where the XLA form rounds between passes.
  level = 1.0 / 255.0 / min(augment.IMAGENET_STD)  # one uint8 step, normalised
  kernel_error = np.abs(np.asarray(run["pallas"](params, clips, "bfloat16")) - xla)
  xla_error = np.abs(np.asarray(run["xla"](params, clips, "bfloat16")) - xla)
  assert kernel_error.mean() < level and kernel_error.max() < 8 * level
  assert kernel_error.mean() <= xla_error.mean()


def test_off_cuda_the_kernel_setting_runs_the_xla_form():
  clips = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 2, 20, 20, 3)), jnp.uint8)
  params = jax.vmap(lambda key: augment.sample_augment_params(
      key, get_config("demo").augment, (20, 20), 16))(jax.random.split(jax.random.key(4), 2))
  params = dataclasses.replace(params, jitter=jnp.array([True, True]))
  outputs = {kernel: np.asarray(jax.jit(lambda p, c, kernel=kernel: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions("float32", "taps", kernel)))(params, clips))
             for kernel in ("xla", "pallas")}
  np.testing.assert_array_equal(outputs["pallas"], outputs["xla"])


def test_the_montage_runs_the_kernel_when_configured():
  config = get_config("demo")
  assert config.augment.jitter_kernel == "auto"
  videos = jnp.zeros((2, config.data.num_frames, 16, 16, 3), jnp.uint8)
  texts = {}
  for kernel in ("auto", "pallas", "xla"):
    config.augment.jitter_kernel = kernel
    fn = montage.make_montage_fn(config, mesh_lib.create_mesh())
    for platform in ("cuda", "cpu"):
      texts[kernel, platform] = fn.trace(videos, jax.random.key(0)).lower(
          lowering_platforms=(platform,)).as_text()
  triton_call = "stablehlo.custom_call @__gpu$xla.gpu.triton"
  # 'auto' is the kernel on CUDA (measured faster on an H200), the XLA form elsewhere.
  assert texts["auto", "cuda"].count(triton_call) == 1
  assert texts["pallas", "cuda"].count(triton_call) == 1
  assert texts["xla", "cuda"].count(triton_call) == 0
  for kernel in ("auto", "pallas", "xla"):
    assert texts[kernel, "cpu"].count(triton_call) == 0


def test_bad_input_is_rejected():
  planes = random_planes(2, (2, 4, 4))
  with pytest.raises(ValueError, match="parameters"):
    jitter_kernel.jitter_gray_frames(planes, jnp.zeros((3, jitter_kernel.NUM_PARAMS)))
  with pytest.raises(ValueError, match="RGB planes"):
    jitter_kernel.jitter_gray_frames(planes[:2], jnp.zeros((2, jitter_kernel.NUM_PARAMS)))
  with pytest.raises(ValueError, match="jitter_kernel"):
    augment.ComputeOptions(jitter_kernel="triton")
  config = get_config("demo").augment
  config.jitter_kernel = "triton"
  with pytest.raises(ValueError, match="augment.jitter_kernel"):
    augment.validate_augment_config(config)
