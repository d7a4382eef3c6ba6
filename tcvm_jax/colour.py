"""Per-pixel colour maths of the colour jitter and grayscale, on separate RGB planes.

Shared by the XLA form (`augment._jitter_planes`) and the fused kernel (`jitter_kernel`),
so both run the same formulas in the same order. Planes are arrays of one shape holding
values in [0, 1].

The jitter is torchvision's ColorJitter: brightness, contrast and saturation are blends
`clip(f * x + (1 - f) * other, 0, 1)` (other: 0, the image's mean grey level, its grey
image), the hue a rotation; all four in a random order. Branch-free form: the three
blends run as "slots" in their relative order before the hue (active where they precede
it) and the same three slots after it; an inactive slot has f = 1, an exact identity on
[0, 1]. Six cheap blends and one hue shift, where computing all four ops at each of the
four positions costs four hue shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale.
HUE_OP = 3  # brightness 0, contrast 1, saturation 2, hue 3: `AugmentParams.jitter_order`.
CONTRAST_OP = 1

Planes = tuple[jax.Array, jax.Array, jax.Array]  # red, green, blue


def gray_plane(planes: Planes) -> jax.Array:
  red, green, blue = planes
  return GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue


def blend_planes(planes: Planes, other: jax.Array, factor: jax.Array) -> Planes:
  return tuple(jnp.clip(factor * plane + (1.0 - factor) * other, 0.0, 1.0)
               for plane in planes)


def blend_slot(planes: Planes, op: jax.Array, factor: jax.Array, gray: jax.Array,
               mean_gray: jax.Array) -> Planes:
  """Brightness (op 0), contrast (1) or saturation (2) by `factor`; `gray` is the planes'
  grey level, `mean_gray` its mean over the image (used by contrast only)."""
  other = jnp.where(op == 0, 0.0, jnp.where(op == CONTRAST_OP, mean_gray, gray))
  return blend_planes(planes, other, factor)


def hue_planes(planes: Planes, shift: jax.Array) -> Planes:
  """Hue rotation by `shift` turns in one elementwise pass (see `augment.adjust_hue`)."""
  red, green, blue = planes
  value = jnp.maximum(jnp.maximum(red, green), blue)
  chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
  divisor = jnp.where(chroma > 0, chroma, 1.0)
  hue6 = jnp.where(value == red, (green - blue) / divisor,
                   jnp.where(value == green, 2.0 + (blue - red) / divisor,
                             4.0 + (red - green) / divisor))
  hue6 = hue6 + 6.0 * shift

  def channel(n):
    k = n + hue6
    k = k - 6.0 * jnp.floor(k * (1.0 / 6.0))  # mod 6 (floor vectorises; fmod does not)
    return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return channel(5.0), channel(3.0), channel(1.0)


def jitter_slots(brightness: jax.Array, contrast: jax.Array, saturation: jax.Array,
                 order: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The slot plan of one clip: `order` is a permutation of range(4) (0 brightness,
  1 contrast, 2 saturation, 3 hue).

  Returns (ops (3,) int32: the blend op of slot pair k, in their relative order;
  factors (6,) float32: slots 0-2 before the hue, 3-5 after it, 1 where inactive).
  """
  position = jnp.argsort(order)  # position[op]: where op comes in the order.
  ops = order[jnp.argsort(order == HUE_OP, stable=True)[:3]]
  after_hue = position[ops] > position[HUE_OP]
  factors = jnp.stack([brightness, contrast, saturation]).astype(jnp.float32)[ops]
  return ops, jnp.concatenate([jnp.where(after_hue, 1.0, factors),
                               jnp.where(after_hue, factors, 1.0)])


def contrast_slot(ops: jax.Array, order: jax.Array) -> jax.Array:
  """Which of the six slots (`jitter_slots`) runs the contrast: int32 ()."""
  position = jnp.argsort(order)
  return jnp.argmax(ops == CONTRAST_OP) + 3 * (position[CONTRAST_OP] > position[HUE_OP])
