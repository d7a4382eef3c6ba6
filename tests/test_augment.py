"""Clip augmentation against NumPy / scipy / colorsys references and torchvision's rules."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import math
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from configs.pretrain import get_config
from tcvm_jax import augment
from train_test_utils import bfloat16_ops

MEAN = augment.IMAGENET_MEAN
STD = augment.IMAGENET_STD


def aug_config() -> ml_collections.ConfigDict:
  return get_config().augment


def random_clip(seed: int, shape=(2, 16, 16, 3)) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def random_images(seed: int, shape=(3, 8, 8, 3)) -> np.ndarray:
  return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def with_fields(params: augment.AugmentParams, **changes) -> augment.AugmentParams:
  return dataclasses.replace(params, **{name: jnp.asarray(value)
                                        for name, value in changes.items()})


# --- Crop box sampling ------------------------------------------------------------------


def torchvision_crop_box(rng: random.Random, height, width, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params, transcribed with Python's RNG."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("in_hw", [(64, 48), (16, 16)])
def test_crop_box_bounds_area_ratio_and_distribution(in_hw):
  height, width = in_hw
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  keys = jax.random.split(jax.random.key(0), 4000)
  boxes = np.asarray(jax.jit(jax.vmap(
      lambda k: augment.sample_crop_box(k, in_hw, scale, ratio)))(keys))
  top, left, h, w = boxes.T
  assert boxes.dtype == np.int32
  assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # Rounded sides come from some (area, ratio) in range: intervals that must overlap.
  area_low, area_high = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
  assert (area_high >= scale[0] * height * width - 1e-6).all()
  assert (area_low <= scale[1] * height * width + 1e-6).all()
  assert ((w + 0.5) / (h - 0.5) >= ratio[0] - 1e-6).all()
  assert ((w - 0.5) / (h + 0.5) <= ratio[1] + 1e-6).all()
  # Same distribution as torchvision's loop (means of area share, aspect, position).
  rng = random.Random(0)
  reference = np.array([torchvision_crop_box(rng, height, width, scale, ratio)
                        for _ in range(4000)])
  for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width),
               lambda b: b[:, 3] / b[:, 2],
               lambda b: (b[:, 0] + b[:, 2] / 2) / height):
    ours, theirs = stat(boxes), stat(reference)
    stderr = math.hypot(ours.std(), theirs.std()) / math.sqrt(len(ours))
    assert abs(ours.mean() - theirs.mean()) < 5 * stderr


def test_crop_box_fallback_is_torchvision_centre_crop():
  # No candidate fits: the whole area at aspect >= 2 never fits in a square.
  for in_hw, ratio in (((16, 16), (2.0, 3.0)), ((16, 40), (0.25, 0.5))):
    box = jax.jit(augment.sample_crop_box, static_argnums=(1, 2, 3))(
        jax.random.key(3), in_hw, (1.0, 1.0), ratio)
    expected = torchvision_crop_box(random.Random(0), *in_hw, (1.0, 1.0), ratio)
    np.testing.assert_array_equal(np.asarray(box), expected)


# --- Crop + resize + flip ---------------------------------------------------------------


def numpy_bilinear_upscale(image: np.ndarray, out_size: int) -> np.ndarray:
  """Half-pixel-centre bilinear with edge clamping (torch align_corners=False)."""
  in_h, in_w = image.shape[:2]

  def taps(o, in_size):
    src = max((o + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(math.floor(src)), in_size - 1)
    return i0, min(i0 + 1, in_size - 1), src - i0

  out = np.zeros((out_size, out_size, image.shape[2]), np.float64)
  for y in range(out_size):
    y0, y1, fy = taps(y, in_h)
    for x in range(out_size):
      x0, x1, fx = taps(x, in_w)
      out[y, x] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                   + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
  return out


def test_crop_resize_matches_numpy_bilinear_when_upscaling():
  clip = random_clip(0, (1, 16, 16, 3))
  box = np.array([3, 5, 7, 9], np.int32)  # top, left, h, w -> upscaled to 12
  ours = np.asarray(jax.jit(augment.crop_resize_flip, static_argnums=3)(
      jnp.asarray(clip), box, False, 12))[0] * 255
  crop = clip[0, 3:10, 5:14].astype(np.float64)
  np.testing.assert_allclose(ours, numpy_bilinear_upscale(crop, 12), atol=1e-3)


@pytest.mark.parametrize("box,out_size", [((0, 0, 16, 16), 6), ((2, 1, 13, 10), 5),
                                          ((4, 3, 5, 11), 8)])
def test_crop_resize_matches_jax_image_resize_with_antialias(box, out_size):
  clip = random_clip(1, (2, 16, 16, 3))
  top, left, h, w = box
  ours = jax.jit(augment.crop_resize_flip, static_argnums=3)(
      jnp.asarray(clip), np.asarray(box, np.int32), False, out_size)
  crop = clip[:, top:top + h, left:left + w].astype(np.float32) / 255
  reference = jax.image.resize(crop, (2, out_size, out_size, 3), "linear", antialias=True)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5)


def test_flip_reverses_columns_and_identity_box_is_identity():
  clip = random_clip(2, (2, 16, 16, 3))
  full = np.array([0, 0, 16, 16], np.int32)
  crop_resize_flip = jax.jit(augment.crop_resize_flip, static_argnums=3)
  plain = np.asarray(crop_resize_flip(jnp.asarray(clip), full, False, 16))
  flipped = np.asarray(crop_resize_flip(jnp.asarray(clip), full, True, 16))
  np.testing.assert_array_equal(np.round(plain * 255).astype(np.uint8), clip)
  np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_center_crop_params_identity_and_centre_square():
  clip = random_clip(3, (2, 16, 16, 3))
  out = jax.jit(augment.center_crop_resize, static_argnums=1)(jnp.asarray(clip), 16)
  np.testing.assert_array_equal(np.asarray(augment.denormalize_to_uint8(out)), clip)
  params = augment.center_crop_params((12, 20), 6)
  np.testing.assert_array_equal(np.asarray(params.crop_box), [0, 4, 12, 12])


# --- Colour -----------------------------------------------------------------------------


def numpy_gray(images):
  return 0.2989 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2]


def test_grayscale_equal_channels_and_weights():
  images = random_images(0)
  gray = np.asarray(augment.grayscale(jnp.asarray(images)))
  for channel in range(3):
    np.testing.assert_allclose(gray[..., channel], numpy_gray(images), atol=1e-6)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_brightness_contrast_saturation_match_torchvision_formulas(factor):
  images = random_images(1)  # (3 frames, 8, 8, 3)
  np.testing.assert_allclose(np.asarray(augment.adjust_brightness(images, factor)),
                             np.clip(images * factor, 0, 1), atol=1e-6)
  frame_mean = numpy_gray(images).mean(axis=(1, 2))[:, None, None, None]  # per frame
  np.testing.assert_allclose(np.asarray(augment.adjust_contrast(images, factor)),
                             np.clip(factor * images + (1 - factor) * frame_mean, 0, 1),
                             atol=1e-6)
  gray = numpy_gray(images)[..., None]
  np.testing.assert_allclose(np.asarray(augment.adjust_saturation(images, factor)),
                             np.clip(factor * images + (1 - factor) * gray, 0, 1), atol=1e-6)


@pytest.mark.parametrize("shift", [-0.1, 0.03, 0.5])
def test_hue_matches_colorsys(shift):
  images = random_images(2, (6, 6, 3))
  images[0, :3] = [0.5, 0.5, 0.5]  # grey pixels have hue 0
  images[1, :3] = [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]]
  expected = np.zeros_like(images)
  for index in np.ndindex(images.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*images[index])
    expected[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  np.testing.assert_allclose(np.asarray(jax.jit(augment.adjust_hue)(images, shift)), expected,
                             atol=1e-5)


def test_color_jitter_follows_order():
  # Every one of the 24 orders against the four ops applied one after another.
  images = jnp.asarray(random_images(3))
  factors = dict(brightness=1.3, contrast=0.7, saturation=1.35, hue=0.08)
  ops = [lambda x: augment.adjust_brightness(x, 1.3), lambda x: augment.adjust_contrast(x, 0.7),
         lambda x: augment.adjust_saturation(x, 1.35), lambda x: augment.adjust_hue(x, 0.08)]
  orders = list(itertools.permutations(range(4)))

  @jax.jit
  def one_after_another(x):
    results = []
    for order in orders:
      y = x
      for op in order:
        y = ops[op](y)
      results.append(y)
    return jnp.stack(results)

  jittered = jax.jit(jax.vmap(lambda order: augment.color_jitter(images, order=order, **factors)))
  outputs = np.asarray(jittered(jnp.asarray(orders)))
  np.testing.assert_allclose(outputs, np.asarray(one_after_another(images)), atol=1e-5)
  assert not np.allclose(outputs[0], outputs[-1], atol=1e-3)  # the order matters here


def test_hue_shift_matches_torchvision_hsv_round_trip():
  # The one-pass hue rotation against the sector-by-sector HSV formulas it replaces.
  images = random_images(10, (4, 9, 9, 3))
  images[0, 0, :3] = [[0.3, 0.3, 0.3], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # grey, pure, black
  for shift in (-0.5, -0.1, 0.0, 0.27, 0.5):
    hsv = np.array(augment.rgb_to_hsv(jnp.asarray(images)))
    hsv[..., 0] = np.mod(hsv[..., 0] + shift, 1.0)
    expected = np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv)))
    np.testing.assert_allclose(np.asarray(augment.adjust_hue(images, shift)), expected,
                               atol=2e-6)


# --- Blur and normalisation -------------------------------------------------------------


def test_blur_radius_spans_ten_percent():
  assert augment.blur_radius(224) == 11 and augment.blur_radius(112) == 5
  assert augment.blur_radius(16) == 1 and augment.blur_radius(2) == 1


def test_blur_preserves_constant_and_matches_scipy_mirror():
  blur = jax.jit(augment.gaussian_blur)
  constant = jnp.full((2, 12, 10, 3), 0.37, jnp.float32)
  np.testing.assert_allclose(np.asarray(blur(constant, 1.3, True)), 0.37, atol=1e-6)
  images = random_images(4, (2, 12, 10, 3))
  sigma, radius = 0.8, augment.blur_radius(10)
  expected = ndimage.gaussian_filter1d(images, sigma, axis=1, mode="mirror", radius=radius)
  expected = ndimage.gaussian_filter1d(expected, sigma, axis=2, mode="mirror", radius=radius)
  np.testing.assert_allclose(np.asarray(blur(images, sigma, True)), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(blur(images, sigma, False)), images)


def test_normalize_formula_and_inverse():
  images = random_images(5)
  ours = np.asarray(augment.normalize(images, MEAN, STD))
  np.testing.assert_allclose(ours, (images - np.array(MEAN)) / np.array(STD), atol=1e-6)
  as_uint8 = np.round(images * 255).astype(np.uint8)
  back = augment.denormalize_to_uint8(
      augment.normalize((as_uint8 / 255.0).astype(np.float32), MEAN, STD))
  np.testing.assert_array_equal(np.asarray(back), as_uint8)


# --- Sampling and the full clip transform ----------------------------------------------


def test_sampled_params_follow_config_distributions():
  config = aug_config()
  keys = jax.random.split(jax.random.key(1), 4000)
  params = jax.jit(jax.vmap(
      lambda k: augment.sample_augment_params(k, config, (20, 24), 56)))(keys)
  for name, prob in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
    rate = np.asarray(getattr(params, name)).mean()
    assert abs(rate - prob) < 4 * math.sqrt(prob * (1 - prob) / 4000), name
  for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                          ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1),
                          ("blur_sigma", 0.1 * 56 / 224, 2.0 * 56 / 224)):
    values = np.asarray(getattr(params, name))
    assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, name
    assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low)
  orders = np.asarray(params.jitter_order)
  np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile(np.arange(4), (4000, 1)))
  assert len({tuple(o) for o in orders}) == 24  # every permutation occurs
  first_op = np.bincount(orders[:, 0], minlength=4) / 4000
  assert np.all(np.abs(first_op - 0.25) < 0.04)
  assert params.out_size == 56 and params.mean == tuple(config.mean)


def test_same_params_same_output_for_every_frame():
  frame = random_clip(6, (1, 16, 16, 3))
  clip = jnp.asarray(np.repeat(frame, 4, axis=0))  # 4 identical frames
  params = augment.sample_augment_params(jax.random.key(7), aug_config(), (16, 16), 12)
  params = with_fields(params, jitter=True, grayscale=False, blur=True, flip=True)
  apply = jax.jit(augment.apply_augment)
  out = np.asarray(apply(params, clip))
  assert out.shape == (4, 12, 12, 3) and out.dtype == np.float32
  for index in range(1, 4):
    np.testing.assert_array_equal(out[index], out[0])
  gray_params = with_fields(params, grayscale=True)
  gray_out = np.asarray(apply(gray_params, clip)) * np.array(STD) + np.array(MEAN)
  np.testing.assert_allclose(gray_out[..., 0], gray_out[..., 1], atol=1e-5)
  np.testing.assert_allclose(gray_out[..., 0], gray_out[..., 2], atol=1e-5)


def test_augment_clip_matches_sample_then_apply_and_dtype():
  clip = jnp.asarray(random_clip(8, (2, 16, 16, 3)))
  config = aug_config()
  key = jax.random.key(9)
  out = jax.jit(lambda k, c: augment.augment_clip(k, c, config, 8, jnp.bfloat16))(key, clip)
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.bfloat16
  params = augment.sample_augment_params(key, config, (16, 16), 8)
  expected = jax.jit(augment.apply_augment, static_argnums=2)(params, clip, "bfloat16")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("chunk_clips", [None, 4])
def test_augment_clips_batch_equals_clip_by_clip(chunk_clips, monkeypatch):
  # chunk_clips=4: CPU augments chunks of 4 clips (here 4 + 2), as the demo's 64 clips
  # go in chunks of 16; by default these 6 small clips are one batch.
  clips = jnp.asarray(random_clip(11, (6, 2, 16, 16, 3)))
  keys = jax.random.split(jax.random.key(12), 6)
  config = aug_config()
  params = jax.vmap(lambda k: augment.sample_augment_params(k, config, (16, 16), 12))(keys)
  # Force every op on for half of the clips, off for the others.
  on = jnp.arange(6) % 2 == 0
  params = with_fields(params, jitter=on, grayscale=~on, blur=on, flip=on)
  if chunk_clips:
    monkeypatch.setattr(augment, "CPU_AUGMENT_CHUNK_PIXELS", chunk_clips * 2 * 16 * 16)
  augment_clips = lambda p, c: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions("float32", "taps", "xla"))  # none 'auto'
  jaxpr = str(jax.make_jaxpr(augment_clips)(params, clips))
  assert ("platform_index" in jaxpr) == bool(chunk_clips)
  batched = np.asarray(jax.jit(augment_clips)(params, clips))
  apply = jax.jit(augment.apply_augment)
  for index in range(6):
    single = jax.tree.map(lambda leaf: leaf[index], params)
    np.testing.assert_allclose(batched[index], np.asarray(apply(single, clips[index])),
                               atol=1e-5)
  with pytest.raises(ValueError, match="clips"):
    augment.augment_clips(params, clips[0])


def test_bfloat16_output_uses_default_precision_close_to_float32():
  clip = jnp.asarray(random_clip(13, (2, 16, 16, 3)))
  params = augment.sample_augment_params(jax.random.key(14), aug_config(), (16, 16), 12)
  assert augment.matmul_precision(jnp.float32) == jax.lax.Precision.HIGHEST
  assert augment.matmul_precision("bfloat16") == jax.lax.Precision.DEFAULT
  full = np.asarray(jax.jit(augment.apply_augment)(params, clip))
  half = np.asarray(jax.jit(augment.apply_augment, static_argnums=2)(params, clip, "bfloat16"))
  # bf16 keeps 8 significant bits: |x| < 3 after normalisation -> error < 3 * 2^-8.
  np.testing.assert_allclose(half.astype(np.float32), full, atol=3 * 2.0**-8)


@pytest.mark.parametrize("field,value,message", [
    ("crop_scale", (0.0, 1.0), "augment.crop_scale"),
    ("crop_scale", (0.5, 1.5), "augment.crop_scale"),
    ("crop_ratio", (2.0, 1.0), "augment.crop_ratio"),
    ("jitter_prob", 1.2, "augment.jitter_prob"),
    ("hue", 0.7, "augment.hue"),
    ("brightness", -0.1, "augment.brightness"),
    ("blur_sigma", (0.0, 2.0), "augment.blur_sigma"),
    ("std", (0.2, 0.0, 0.2), "augment.std"),
])
def test_bad_config_is_rejected_with_the_setting_name(field, value, message):
  config = aug_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    augment.sample_augment_params(jax.random.key(0), config, (16, 16), 8)


def test_bad_inputs_are_rejected():
  params = augment.center_crop_params((16, 16), 8)
  with pytest.raises(TypeError, match="uint8"):
    augment.apply_augment(params, jnp.zeros((2, 16, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match="model.dtype"):
    augment.apply_augment(params, jnp.zeros((2, 16, 16, 3), jnp.uint8), jnp.int32)
  with pytest.raises(ValueError, match="output_size"):
    augment.center_crop_params((16, 16), 0)


def test_bfloat16_planes_stay_within_a_few_uint8_levels_of_float32():
  # plane_dtype=bfloat16 (what benchmarks/augment_variants.py times for the GPU): the
  # planes are stored in bfloat16 between passes, each pass computes in float32.
  config = get_config("demo").augment
  clips = jnp.asarray(np.random.default_rng(0).integers(0, 256, (12, 4, 40, 48, 3)),
                      jnp.uint8)
  params = jax.vmap(lambda key: augment.sample_augment_params(key, config, (40, 48), 32))(
      jax.random.split(jax.random.key(0), 12))
  reference = augment.augment_clips(params, clips, jnp.float32)
  halved = augment.augment_clips(params, clips, jnp.float32,
                                 augment.ComputeOptions(plane_dtype=jnp.bfloat16))
  assert halved.dtype == jnp.float32
  error = np.abs(np.asarray(halved) - np.asarray(reference))
  level = 1.0 / 255.0 / min(augment.IMAGENET_STD)  # one uint8 step, normalised
  assert error.mean() < level and error.max() < 8 * level
  np.testing.assert_array_equal(  # float32: the same program as 'auto' off CUDA
      np.asarray(augment.augment_clips(params, clips, jnp.float32,
                                       augment.ComputeOptions(plane_dtype="float32"))),
      np.asarray(reference))
  lowered = jax.jit(lambda p, c: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions(jnp.bfloat16))
                    ).lower(params, clips).as_text()
  assert "xbf16>" in lowered and "xbf16>" not in jax.jit(lambda p, c: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions("float32"))).lower(params, clips).as_text()


@pytest.mark.parametrize("blur", [True, False])
def test_blur_rows_as_one_matmul_equal_the_taps(blur):
  # augment.blur_rows='matmul' folds the reflect borders into an (S, S) filter: the same
  # blur as the taps over the padded planes, and still exactly x when the blur is off.
  config = get_config("demo").augment
  clips = jnp.asarray(np.random.default_rng(3).integers(0, 256, (6, 4, 40, 48, 3)), jnp.uint8)
  params = jax.vmap(lambda key: augment.sample_augment_params(key, config, (40, 48), 32))(
      jax.random.split(jax.random.key(3), 6))
  params = with_fields(params, blur=jnp.full(6, blur))
  taps = augment.augment_clips(params, clips, jnp.float32,
                               augment.ComputeOptions("float32", "taps"))
  matmul = augment.augment_clips(params, clips, jnp.float32,
                                 augment.ComputeOptions("float32", "matmul"))
  np.testing.assert_allclose(np.asarray(matmul), np.asarray(taps), atol=2e-5)
  texts = {rows: jax.jit(lambda p, c, rows=rows: augment.augment_clips(
      p, c, jnp.float32, augment.ComputeOptions("float32", rows))).lower(params, clips).as_text()
           for rows in ("taps", "matmul")}
  # No reflect-padded copy of the planes (numpy's 'reflect' pad: reversed slices joined).
  for op in ("stablehlo.reverse", "stablehlo.concatenate"):
    assert texts["matmul"].count(op) < texts["taps"].count(op), op
  with pytest.raises(ValueError, match="blur_rows"):
    augment.ComputeOptions("float32", "dense")


def test_auto_planes_are_bfloat16_on_cuda_only():
  config = get_config("demo").augment
  assert config.plane_dtype == "auto"
  clips = jnp.zeros((2, 4, 40, 48, 3), jnp.uint8)
  params = jax.vmap(lambda key: augment.sample_augment_params(key, config, (40, 48), 32))(
      jax.random.split(jax.random.key(0), 2))
  texts = {
      (plane, platform): jax.jit(
          lambda p, c, plane=plane: augment.augment_clips(
              p, c, jnp.float32, augment.ComputeOptions(plane))).trace(
              params, clips).lower(lowering_platforms=(platform,)).as_text()
      for plane in ("auto", "float32") for platform in ("cpu", "cuda", "tpu")}
  bf16_ops = {key: bfloat16_ops(text) for key, text in texts.items()}
  assert bf16_ops["auto", "cuda"] > 10
  for key in [("auto", "cpu"), ("auto", "tpu"), ("float32", "cuda")]:
    assert bf16_ops[key] == 0, key
  with pytest.raises(ValueError, match="plane_dtype"):
    augment.ComputeOptions(jnp.float16)
  config.plane_dtype = "float16"
  with pytest.raises(ValueError, match="plane_dtype"):
    augment.validate_augment_config(config)


def test_compute_options_read_the_config_and_name_a_bad_switch():
  # config.augment's switches of how (not what) the augmentation computes, read once.
  config = get_config().augment
  assert augment.compute_options(config) == augment.ComputeOptions()
  config.blur_rows = "matmul"
  options = augment.compute_options(config, jitter_kernel="pallas")
  assert (options.plane_dtype, options.blur_rows, options.jitter_kernel) == (
      "auto", "matmul", "pallas")
  del config["plane_dtype"]  # an older config without the field: the default
  assert augment.compute_options(config).plane_dtype == "auto"
  assert augment.compute_options(None) == augment.ComputeOptions()
  # A dtype is kept by name, so options stay hashable (jit's static arguments).
  assert augment.ComputeOptions(jnp.bfloat16) == augment.ComputeOptions("bfloat16")
  assert len({augment.ComputeOptions(jnp.bfloat16), augment.ComputeOptions("bfloat16")}) == 1
  assert augment.ComputeOptions().planes_dtype(on_cuda=True) == jnp.bfloat16
  assert augment.ComputeOptions().planes_dtype() == jnp.float32
  assert augment.ComputeOptions("float32").planes_dtype(on_cuda=True) == jnp.float32
  # Every 'auto' resolved per platform; explicit choices stay.
  assert augment.ComputeOptions().resolved(on_cuda=True) == augment.ComputeOptions(
      "bfloat16", "matmul", "pallas")
  assert augment.ComputeOptions().resolved() == augment.ComputeOptions("float32", "taps", "xla")
  assert augment.ComputeOptions("float32", "auto", "xla").resolved(on_cuda=True) == (
      augment.ComputeOptions("float32", "matmul", "xla"))
  assert augment.ComputeOptions().has_auto
  assert not augment.ComputeOptions("float32", "taps", "xla").has_auto
  for name, bad in (("plane_dtype", "float16"), ("blur_rows", "dense"),
                    ("jitter_kernel", "triton")):
    with pytest.raises(ValueError, match=f"augment.{name}='{bad}'"):
      augment.compute_options(config, **{name: bad})
