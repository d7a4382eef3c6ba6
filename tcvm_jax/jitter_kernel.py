"""Colour jitter and random grayscale as one fused GPU kernel (Pallas, Triton backend).

`augment._jitter_planes` runs the jitter as XLA passes: six blend slots, each a reduction
(the contrast's mean grey level) and an elementwise pass over all three planes, plus the
hue shift and the grayscale select; the planes go through memory ~20 times. XLA cannot
fuse the chain (each op reads all three planes of the one before, so a fused loop
recomputes it ~3^n times: `augment.py`). Here one program per frame runs the whole
chain on chunks of pixels held in registers:

  phase 1  the chain up to the contrast slot, summing the grey level there (its mean
           is the contrast's reference level; the ops after it cannot change it);
  phase 2  the whole chain with that mean, the jitter and grayscale selects, one store.

The frame is read twice (the second read mostly from L2) and written once. Maths and
order are `augment._jitter_planes`'s, in float32 throughout: with float32 planes the
result equals it up to rounding; with bfloat16 planes it skips the five intermediate
roundings to bfloat16 the XLA form makes between passes.

`augment.jitter_kernel='pallas'` selects it on CUDA (`augment._jitter_and_gray`); other
platforms run the XLA form. `interpret=True` runs the kernel in Pallas's interpreter, on
any platform (slowly): what the tests check it with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from tcvm_jax import colour

# Per-frame parameters, one float32 row each (a power of two wide, as Triton needs).
NUM_PARAMS = 16
SLOT_FACTORS = slice(0, 6)  # blend factor of slots 0-2 (before the hue) and 3-5 (after)
SLOT_OPS = slice(6, 9)  # each slot pair's op: 0 brightness, 1 contrast, 2 saturation
CONTRAST_SLOT = 9  # which of the six slots runs the contrast (its factor may be 1)
HUE = 10  # hue shift in turns
JITTER = 11  # 1: keep the jittered planes, 0: the input planes
GRAYSCALE = 12  # 1: replace the planes by their grey level
PIXELS_PER_CHUNK = 1024  # pixels per loop step (a power of two): 8 per thread with 4 warps
NUM_WARPS = 4


def _frame_kernel(params_ref, planes_ref, out_ref, *, pixels: int):
  """One frame: `planes_ref` and `out_ref` are its (3, pixels) RGB planes, `params_ref`
  its (NUM_PARAMS,) parameters."""
  factors = [params_ref[i] for i in range(SLOT_FACTORS.start, SLOT_FACTORS.stop)]
  ops = [params_ref[i] for i in range(SLOT_OPS.start, SLOT_OPS.stop)]
  contrast_slot = params_ref[CONTRAST_SLOT]
  shift = params_ref[HUE]
  num_chunks = pl.cdiv(pixels, PIXELS_PER_CHUNK)

  def load(start):
    index = start + jnp.arange(PIXELS_PER_CHUNK)
    mask = index < pixels
    window = pl.ds(start, PIXELS_PER_CHUNK)
    # (1, chunk) windows: Pallas's interpreter cannot load at an integer index.
    planes = tuple(pallas_triton.load(planes_ref.at[pl.ds(channel, 1), window],
                                      mask=mask[None], other=0.0)[0].astype(jnp.float32)
                   for channel in range(3))
    return planes, mask, window

  def chain(planes, mean_gray):
    """The six slots and the hue; also returns the grey level at the contrast slot."""
    at_contrast = jnp.zeros_like(planes[0])
    for slot in range(6):
      if slot == 3:
        planes = colour.hue_planes(planes, shift)
      gray = colour.gray_plane(planes)
      at_contrast = jnp.where(contrast_slot == slot, gray, at_contrast)
      planes = colour.blend_slot(planes, ops[slot % 3], factors[slot], gray, mean_gray)
    return planes, at_contrast

  def sum_gray(chunk, total):
    planes, mask, _ = load(chunk * PIXELS_PER_CHUNK)
    # The mean is not known yet: the contrast slot's output is not used in this phase.
    _, at_contrast = chain(planes, jnp.float32(0.0))
    return total + jnp.sum(jnp.where(mask, at_contrast, 0.0))

  mean_gray = jax.lax.fori_loop(0, num_chunks, sum_gray, jnp.float32(0.0)) / pixels
  keep_jitter = params_ref[JITTER] > 0.5
  to_gray = params_ref[GRAYSCALE] > 0.5

  def write(chunk, carry):
    planes, mask, window = load(chunk * PIXELS_PER_CHUNK)
    jittered, _ = chain(planes, mean_gray)
    planes = tuple(jnp.where(keep_jitter, new, old) for new, old in zip(jittered, planes))
    gray = colour.gray_plane(planes)
    for channel, plane in enumerate(planes):
      pallas_triton.store(out_ref.at[pl.ds(channel, 1), window],
                          jnp.where(to_gray, gray, plane).astype(out_ref.dtype)[None],
                          mask=mask[None])
    return carry

  jax.lax.fori_loop(0, num_chunks, write, 0)


def frame_params(brightness, contrast, saturation, hue, order, jitter, grayscale):
  """One clip's (NUM_PARAMS,) row from `augment.AugmentParams`' jitter fields."""
  ops, factors = colour.jitter_slots(brightness, contrast, saturation, order)
  row = jnp.concatenate([
      factors, ops.astype(jnp.float32),
      jnp.stack([colour.contrast_slot(ops, order).astype(jnp.float32),
                 jnp.asarray(hue, jnp.float32), jnp.asarray(jitter, jnp.float32),
                 jnp.asarray(grayscale, jnp.float32)])])
  return jnp.pad(row, (0, NUM_PARAMS - row.shape[0]))


def jitter_gray_frames(planes: jax.Array, params: jax.Array,
                       interpret: bool = False) -> jax.Array:
  """RGB planes (3, F, H, W) of values in [0, 1] (any float dtype) and per-frame rows
  (F, NUM_PARAMS) (`frame_params`) -> the jittered, maybe grey, planes, same shape and
  dtype. The planes stay stacked: the resampling makes them so and the blur takes them
  so, and slicing them apart for the kernel would copy them."""
  if planes.ndim != 4 or planes.shape[0] != 3:
    raise ValueError(f"Expected RGB planes (3, F, H, W), got shape {planes.shape}.")
  _, num_frames, height, width = planes.shape
  pixels = height * width
  if params.shape != (num_frames, NUM_PARAMS):
    raise ValueError(f"Expected parameters ({num_frames}, {NUM_PARAMS}), got {params.shape}.")
  flat = planes.reshape(3, num_frames, pixels)
  plane_spec = pl.BlockSpec((3, None, pixels), lambda frame: (0, frame, 0))
  out = pl.pallas_call(
      functools.partial(_frame_kernel, pixels=pixels),
      # Inside shard_map (the montage) the output varies over the mesh as the input does.
      out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype,
                                     manual_axis_type=jax.typeof(flat).manual_axis_type),
      grid=(num_frames,),
      in_specs=[pl.BlockSpec((None, NUM_PARAMS), lambda frame: (frame, 0)), plane_spec],
      out_specs=plane_spec,
      compiler_params=pallas_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
  )(params.astype(jnp.float32), flat)
  return out.reshape(planes.shape)
