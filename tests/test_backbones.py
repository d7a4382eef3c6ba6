"""Backbones: exact parameter counts, the 2D-lowered conv vs a true 3D conv, TSM shift."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from tcvm_jax import backbones, layers, model as model_lib
from train_test_utils import REPO_ROOT, reduce_window_max_pool, run_json_child


def count_params(module: nnx.Module) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


# --- Full-size models: counts and shapes without allocating anything ----------

# pytorchvideo slow_r50 (32,454,096) minus its 2048x400 head; torchvision resnet50
# (25,557,032) minus its 2048x1000 fc.
@pytest.mark.parametrize("name, expected_params", [("r3d50", 32_454_096 - (2048 * 400 + 400)),
                                                    ("tsm50", 25_557_032 - (2048 * 1000 + 1000))])
def test_full_backbone_param_count_and_output_shape(name, expected_params):
  backbone = nnx.eval_shape(lambda: backbones.get_backbone(name, rngs=nnx.Rngs(0)))
  assert count_params(backbone) == expected_params
  assert backbone.num_features == 2048
  frame_features = nnx.eval_shape(lambda b, x: b(x), backbone,
                                  jax.ShapeDtypeStruct((2, 32, 112, 112, 3), jnp.float32))
  assert frame_features.shape == (2, 32, 4, 4, 2048)


def test_r3d50_temporal_kernels_only_in_res4_res5_conv_a():
  backbone = nnx.eval_shape(lambda: backbones.get_backbone("r3d50", rngs=nnx.Rngs(0)))
  for stage_index, blocks in enumerate(backbone.stages):
    for block in blocks:
      assert block.conv_a.kernel.shape[0] == (3 if stage_index >= 2 else 1)
      assert block.conv_b.kernel.shape[:3] == (1, 3, 3)
      assert block.conv_c.kernel.shape[:3] == (1, 1, 1)
  tiny = nnx.eval_shape(lambda: backbones.get_backbone("r3d_tiny", rngs=nnx.Rngs(0)))
  assert [blocks[0].conv_a.kernel.shape[0] for blocks in tiny.stages] == [1, 1, 3, 3]


# --- VideoConv == 3D convolution -------------------------------------------------

@pytest.mark.parametrize("kernel_size, stride", [
    ((1, 3, 3), 1), ((1, 3, 3), 2), ((1, 7, 7), 2), ((3, 1, 1), 1), ((5, 1, 1), 1),
    ((1, 1, 1), 1), ((1, 1, 1), 2), ((3, 1, 1), 2)])
def test_video_conv_matches_3d_convolution(kernel_size, stride):
  conv = layers.VideoConv(5, 6, kernel_size, stride=stride, rngs=nnx.Rngs(0))
  videos = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 9, 8, 5)),
                       jnp.float32)  # odd H on purpose
  kt, kh, kw = kernel_size
  reference = jax.lax.conv_general_dilated(
      videos, conv.kernel[...], window_strides=(1, stride, stride),
      padding=((kt // 2, kt // 2), (kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(conv(videos)), np.asarray(reference),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_features, height, width", [(3, 10, 9), (3, 9, 12), (2, 7, 7)])
def test_few_channel_strided_conv_values_and_gradients_match_3d_convolution(
    in_features, height, width):
  # The stem path: (1,7,7) stride 2 over <= 4 channels trains through space-to-depth.
  conv = layers.VideoConv(in_features, 6, (1, 7, 7), stride=2, rngs=nnx.Rngs(0))
  assert in_features <= layers.SPACE_TO_DEPTH_MAX_CHANNELS
  rng = np.random.default_rng(2)
  videos = jnp.asarray(rng.normal(size=(2, 3, height, width, in_features)), jnp.float32)

  def reference(kernel, videos):
    return jax.lax.conv_general_dilated(
        videos, kernel, window_strides=(1, 2, 2), padding=((0, 0), (3, 3), (3, 3)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=jax.lax.Precision.HIGHEST)

  kernel = conv.kernel[...]
  expected = reference(kernel, videos)
  np.testing.assert_allclose(np.asarray(conv(videos)), np.asarray(expected), rtol=1e-4,
                             atol=1e-4)
  cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)

  graphdef, state = nnx.split(conv)

  def ours(kernel, videos):
    new_state = jax.tree.map(lambda _: kernel, state)  # the kernel is the only leaf
    return nnx.merge(graphdef, new_state)(videos)

  # Under differentiation the space-to-depth forward pass and its custom backward run.
  outputs, vjp = jax.vjp(ours, kernel, videos)
  expected_outputs, expected_vjp = jax.vjp(reference, kernel, videos)
  np.testing.assert_allclose(np.asarray(outputs), np.asarray(expected_outputs), rtol=1e-4,
                             atol=1e-4)
  for grad, expected_grad in zip(vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("height, width, kernel, stride", [
    (9, 12, 7, 2), (10, 9, 7, 2), (8, 8, 3, 2), (11, 7, 5, 3)])
def test_space_to_depth_conv_equals_strided_conv(height, width, kernel, stride):
  # The CPU training forward pass, called directly (platform_dependent picks it on CPU).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  np.testing.assert_allclose(np.asarray(layers._conv2d_space_to_depth(x, weights, stride)),
                             np.asarray(layers._conv2d(x, weights, stride)), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kt", [1, 3, 5])
def test_temporal_conv_as_matmuls_equals_the_2d_conv_with_gradients(kt):
  # CPU computes temporal kernels as kt shifted matmuls, other backends as a 2D conv; both
  # are called directly here (platform_dependent picks the first on this machine).
  rng = np.random.default_rng(5)
  pixels = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)  # (B, T, P, Cin)
  kernel = jnp.asarray(rng.normal(size=(kt, 4, 3)), jnp.float32)
  conv_out, conv_vjp = jax.vjp(layers._temporal_conv_2d, pixels, kernel)
  matmul_out, matmul_vjp = jax.vjp(layers._temporal_conv_as_matmuls, pixels, kernel)
  np.testing.assert_allclose(np.asarray(matmul_out), np.asarray(conv_out), rtol=1e-5,
                             atol=1e-5)
  cotangent = jnp.asarray(rng.normal(size=conv_out.shape), jnp.float32)
  for ours, expected in zip(matmul_vjp(cotangent), conv_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [layers._conv2d_space_to_depth,
                                  layers._conv2d_space_to_depth_matmul])
@pytest.mark.parametrize("height, width, kernel, stride", [(9, 12, 7, 2), (11, 7, 5, 3)])
def test_space_to_depth_forms_equal_strided_conv_with_gradients(conv, height, width, kernel,
                                                                stride):
  # Called directly: the space-to-depth graph's VJP is the CUDA backward pass (this
  # machine has no GPU, so platform_dependent never picks it here); its one-matmul form
  # is what benchmarks/stem_variants.py times. Same values and gradients as the plain conv.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  plain_out, plain_vjp = jax.vjp(functools.partial(layers._conv2d, stride=stride), x, weights)
  ours_out, ours_vjp = jax.vjp(functools.partial(conv, stride=stride), x, weights)
  np.testing.assert_allclose(np.asarray(ours_out), np.asarray(plain_out), rtol=1e-5,
                             atol=1e-5)
  cotangent = jnp.asarray(rng.normal(size=plain_out.shape), jnp.float32)
  for ours, expected in zip(ours_vjp(cotangent), plain_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num, chunk_frames, num_chunks", [(6, 2, 3), (8, 3, 2), (5, 2, 1),
                                                         (4, 4, 1), (3, 7, 1)])
def test_stem_weight_gradient_in_chunks_equals_xla_gradients(num, chunk_frames, num_chunks):
  # The CPU backward pass of few-channel strided convs (the stem): the weight gradient
  # summed over equal strided chunks of frames (3 of 2, 2 of 4 where 3 of ~3 cannot be
  # equal, one chunk where 5 frames do not split, one chunk, one short chunk), called
  # directly and through the custom VJP (platform_dependent picks it on this machine).
  height, width, stride = 9, 12, 2
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(num, height, width, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(7, 7, 3, 5)), jnp.float32)
  plain_out, plain_vjp = jax.vjp(functools.partial(layers._conv2d, stride=stride), x, weights)
  cotangent = jnp.asarray(rng.normal(size=plain_out.shape), jnp.float32)
  expected = plain_vjp(cotangent)
  direct = layers._conv_vjp_weight_grad_in_chunks(
      x, weights, cotangent, stride, chunk_pixels=chunk_frames * height * width)
  chunks = str(jax.make_jaxpr(functools.partial(
      layers._conv_vjp_weight_grad_in_chunks, stride=stride,
      chunk_pixels=chunk_frames * height * width))(x, weights, cotangent))
  # One weight-gradient conv per chunk, plus the input gradient's; each traced vjp also
  # holds its forward conv (unused, dropped by XLA).
  assert chunks.count("conv_general_dilated") == 2 * (num_chunks + 1)
  _, custom_vjp = jax.vjp(functools.partial(layers._strided_conv_few_channels, stride=stride),
                          x, weights)
  for grads in (direct, custom_vjp(cotangent)):
    for ours, reference in zip(grads, expected):
      assert ours.shape == reference.shape
      np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-4,
                                 atol=1e-4)


_SHARDED_STEM_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from benchmarks.jax_step import collective_bytes
from tcvm_jax import cpu_chunks, layers, mesh as mesh_lib
frames, size = 32, 112  # 8 frames per device; 4 strided chunks of 8 (12544 pixels each)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(frames, size, size, 3)), jnp.float32)
kernel = jnp.asarray(rng.normal(size=(7, 7, 3, 8)), jnp.float32)
cotangent = jnp.asarray(rng.normal(size=(frames, size // 2, size // 2, 8)), jnp.float32)
def grads(x, kernel, cotangent):
  _, vjp = jax.vjp(lambda x, k: layers._strided_conv_few_channels(x, k, 2), x, kernel)
  return vjp(cotangent)
mesh = mesh_lib.create_mesh()
split = mesh_lib.batch_sharding(mesh)
step = jax.jit(grads, in_shardings=(split, mesh_lib.replicated_sharding(mesh), split))
compiled = step.lower(x, kernel, cotangent).compile()
sharded = compiled(jax.device_put(x, split), kernel, jax.device_put(cotangent, split))
single = jax.jit(grads)(x, kernel, cotangent)
chunk = cpu_chunks.chunk_size(frames, size * size, layers.CPU_WEIGHT_GRAD_CHUNK_PIXELS)
print(json.dumps({
    "devices": jax.device_count(),
    "num_chunks": cpu_chunks.strided_chunk_count(frames, chunk),
    "collectives": {op: v for op, v in collective_bytes(compiled.as_text()).items()
                    if v["count"]},
    "errors": [float(jnp.abs(a - b).max() / jnp.abs(b).max())
               for a, b in zip(sharded, single)]}))
"""


def test_stem_weight_gradient_chunks_stay_on_their_devices():
  # Frames split over 4 devices (the batch's sharding): each strided chunk takes 2 of
  # every device's 8 frames, so the chunks' weight gradients need one all-reduce of the
  # kernel gradient and nothing else (contiguous chunks were moved between devices by
  # collective-permutes); the gradients equal one device's.
  report = run_json_child(_SHARDED_STEM_CHILD, 4, REPO_ROOT)
  assert report["devices"] == 4 and report["num_chunks"] == 4
  assert set(report["collectives"]) == {"all-reduce"}, report["collectives"]
  kernel_gradient_bytes = 7 * 7 * 3 * 8 * 4
  assert report["collectives"]["all-reduce"]["bytes"] <= 4 * kernel_gradient_bytes
  assert max(report["errors"]) < 1e-5, report["errors"]


@pytest.mark.parametrize("features", [8, layers.SPACE_TO_DEPTH_CPU_MAX_FEATURES + 1, 64])
def test_stem_trains_by_space_to_depth_on_cpu_only_when_narrow(features):
  # CPU training forward pass: space-to-depth (a 4x4 conv over 12 channels) up to
  # SPACE_TO_DEPTH_CPU_MAX_FEATURES output channels, the plain strided 7x7 conv above;
  # CUDA always space-to-depth. The same values either way (tests above).
  x = jnp.zeros((2, 16, 16, 3))
  weights = jnp.zeros((7, 7, 3, features))

  def lowered(platform):
    forward = jax.jit(lambda x, w: jax.vjp(
        functools.partial(layers._strided_conv_few_channels, stride=2), x, w)[0])
    return forward.trace(x, weights).lower(lowering_platforms=(platform,)).as_text()

  by_blocks = f"tensor<4x4x12x{features}xf32>"
  narrow = features <= layers.SPACE_TO_DEPTH_CPU_MAX_FEATURES
  assert (by_blocks in lowered("cpu")) == narrow
  assert by_blocks in lowered("cuda")


@pytest.mark.parametrize("height, width, in_features, out_features, kernel, stride", [
    (14, 14, 16, 16, 3, 2), (7, 9, 8, 5, 3, 2), (4, 4, 8, 8, 3, 2), (11, 10, 6, 4, 5, 3),
    (5, 5, 7, 3, 1, 2)])
def test_strided_conv_gradients_by_taps_equal_xla_gradients(height, width, in_features,
                                                            out_features, kernel, stride):
  # The CPU backward pass of strided convs over many channels, called directly and through
  # the custom VJP (platform_dependent picks it on this machine), against XLA's autodiff
  # of the plain convolution.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, height, width, in_features)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, in_features, out_features)),
                        jnp.float32)
  plain_out, plain_vjp = jax.vjp(functools.partial(layers._conv2d, stride=stride), x, weights)
  cotangent = jnp.asarray(rng.normal(size=plain_out.shape), jnp.float32)
  expected = plain_vjp(cotangent)
  direct = layers._strided_conv_vjp_by_taps(x, weights, cotangent, stride)
  custom_out, custom_vjp = jax.vjp(functools.partial(layers._strided_conv, stride=stride),
                                   x, weights)
  np.testing.assert_array_equal(np.asarray(custom_out), np.asarray(plain_out))
  for grads in (direct, custom_vjp(cotangent)):
    for ours, reference in zip(grads, expected):
      assert ours.shape == reference.shape
      np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-4,
                                 atol=1e-4)


def test_video_conv_strided_many_channels_trains_through_the_taps_gradient():
  conv = layers.VideoConv(8, 6, (1, 3, 3), stride=2, rngs=nnx.Rngs(0))
  assert conv.in_features > layers.SPACE_TO_DEPTH_MAX_CHANNELS
  videos = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, 9, 8, 8)), jnp.float32)
  # The gradient is the custom one: a platform-dependent choice between the taps (CPU)
  # and XLA's own; a stride-1 conv of the same shape has no such choice.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: conv(v).sum()))(videos))
  assert "platform_index" in jaxpr and jaxpr.count("dot_general") == 2
  plain = layers.VideoConv(8, 6, (1, 3, 3), stride=1, rngs=nnx.Rngs(0))
  assert "platform_index" not in str(jax.make_jaxpr(jax.grad(lambda v: plain(v).sum()))(videos))


@pytest.mark.parametrize("kernel_size", [(3, 3, 3), (3, 1, 3), (1, 2, 2), (2, 1, 1)])
def test_video_conv_rejects_unsupported_kernels(kernel_size):
  with pytest.raises(ValueError, match="kernel"):
    layers.VideoConv(4, 4, kernel_size, rngs=nnx.Rngs(0))


def test_video_conv_he_fan_out_init_and_dtypes():
  conv = layers.VideoConv(64, 256, (3, 1, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  kernel = np.asarray(conv.kernel[...])
  assert kernel.dtype == np.float32
  expected_std = np.sqrt(2.0 / (3 * 256))  # fan_out = kt*kh*kw*Cout
  assert abs(kernel.std() / expected_std - 1) < 0.05
  y = conv(jnp.ones((1, 3, 2, 2, 64)))
  assert y.dtype == jnp.bfloat16


# --- Temporal Shift Module --------------------------------------------------------

def numpy_temporal_shift(x, shift_div):
  """Loops over frames: channels [0, f) read frame t+1, [f, 2f) read t-1, zero outside."""
  out = np.zeros_like(x)
  frames, channels = x.shape[1], x.shape[-1]
  fold = channels // shift_div
  for t in range(frames):
    if t + 1 < frames:
      out[:, t, ..., :fold] = x[:, t + 1, ..., :fold]
    if t - 1 >= 0:
      out[:, t, ..., fold:2 * fold] = x[:, t - 1, ..., fold:2 * fold]
    out[:, t, ..., 2 * fold:] = x[:, t, ..., 2 * fold:]
  return out


@pytest.mark.parametrize("channels, shift_div", [(16, 8), (20, 8), (12, 4)])
def test_temporal_shift_matches_numpy(channels, shift_div):
  x = np.random.default_rng(0).normal(size=(3, 5, 2, 2, channels)).astype(np.float32)
  shifted = np.asarray(backbones.temporal_shift(jnp.asarray(x), shift_div))
  np.testing.assert_array_equal(shifted, numpy_temporal_shift(x, shift_div))
  fold = channels // shift_div
  # Zero fill at the ends, not wrap-around.
  assert np.all(shifted[:, -1, ..., :fold] == 0)
  assert np.all(shifted[:, 0, ..., fold:2 * fold] == 0)


def test_shift_barrier_keeps_values_and_gradients_and_reaches_every_tsm_block():
  # model.tsm_shift='barrier' (a workaround for XLA's Triton GEMM fusion on CUDA) changes
  # where XLA may fuse, never what the backbone computes.
  videos = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 32, 32, 3)), jnp.float32)
  results, programs = [], []
  for tsm_shift in ("auto", "barrier"):
    model = backbones.get_backbone("tsm_tiny", tsm_shift=tsm_shift, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(videos)))
    lowered = jax.jit(jax.value_and_grad(loss)).lower(state)
    programs.append(lowered.as_text())
    results.append(lowered.compile()(state))
  (value, grads), (barrier_value, barrier_grads) = results
  assert float(barrier_value) == float(value)
  jax.tree.map(np.testing.assert_array_equal, barrier_grads, grads)
  # One barrier per block forward, one on its gradient: 4 blocks in tsm_tiny.
  barrier = "stablehlo.optimization_barrier"
  assert programs[0].count(barrier) == 0 and programs[1].count(barrier) == 2 * 4
  with pytest.raises(ValueError, match="model.tsm_shift"):
    backbones.get_backbone("tsm_tiny", tsm_shift="on", rngs=nnx.Rngs(0))
  config = pretrain.get_config("demo")
  config.model.backbone, config.model.tsm_shift = "tsm_tiny", "barrier"
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, backbones.Bottleneck)]
  assert len(blocks) == 4 and all(block.shift_barrier for block in blocks)


def test_temporal_shift_never_mixes_videos():
  x = np.random.default_rng(1).normal(size=(2, 4, 1, 1, 16)).astype(np.float32)
  changed = x.copy()
  changed[1] += 10.0
  shifted = np.asarray(backbones.temporal_shift(jnp.asarray(x)))
  shifted_changed = np.asarray(backbones.temporal_shift(jnp.asarray(changed)))
  np.testing.assert_array_equal(shifted[0], shifted_changed[0])


# --- Tiny backbones: real forward passes ---------------------------------------

def jit_apply(module: nnx.Module):
  """module(x) compiled over its split state (eager NNX calls compile op by op)."""
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return lambda x: forward(state, x)


def changed_frames(backbone, videos, video_index, frame_index):
  """Which output frames change when one input frame of one video is perturbed."""
  perturbed = videos.at[video_index, frame_index].add(1.0)
  features = jit_apply(backbone)(jnp.concatenate([videos, perturbed]))
  difference = np.abs(np.asarray(features[len(videos):] - features[:len(videos)]))
  return difference.max(axis=(2, 3, 4)) > 1e-6  # (B, T)


@pytest.fixture(scope="module")
def videos():
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tiny_backbones():
  # Non-zero residual init so that the temporal mixing inside the branches is active;
  # eval mode (running BN statistics) so that videos in a batch are independent.
  built = {name: backbones.get_backbone(name, zero_init_residual=False, rngs=nnx.Rngs(0))
           for name in ("r3d_tiny", "tsm_tiny")}
  for backbone in built.values():
    backbone.eval()
  return built


def test_zero_init_residual_by_default(tiny_backbones):
  tiny = backbones.get_backbone("r3d_tiny", rngs=nnx.Rngs(0))
  for blocks in tiny.stages:
    assert np.all(np.asarray(blocks[0].bn_c.scale[...]) == 0)
    assert np.all(np.asarray(blocks[0].bn_a.scale[...]) == 1)
  assert np.all(np.asarray(tiny_backbones["r3d_tiny"].stages[0][0].bn_c.scale[...]) == 1)


@pytest.mark.parametrize("name, receptive_radius", [("r3d_tiny", 2), ("tsm_tiny", 4)])
def test_tiny_backbone_forward_and_temporal_receptive_field(name, receptive_radius, videos,
                                                            tiny_backbones):
  backbone = tiny_backbones[name]
  frame_features = jit_apply(backbone)(videos)
  assert frame_features.shape == (2, 8, 1, 1, 256) and backbone.num_features == 256
  assert np.all(np.isfinite(np.asarray(frame_features)))

  changed = changed_frames(backbone, videos, video_index=1, frame_index=3)
  assert not changed[0].any(), "a perturbation in video 1 leaked into video 0"
  frames = np.arange(8)
  # r3d_tiny: two kt=3 convs (res4, res5) -> +-2 frames; tsm_tiny: 4 shifts -> +-4.
  np.testing.assert_array_equal(changed[1] & (np.abs(frames - 3) > receptive_radius), False)
  assert changed[1, 3] and changed[1, 2] and changed[1, 4]


def test_per_frame_resnet3d_does_not_mix_frames(videos, tiny_backbones):
  backbone = backbones.ResNet3D(stage_sizes=(1, 1, 1, 1), width=8,
                                stage_temporal_kernels=(1, 1, 1, 1),
                                zero_init_residual=False, rngs=nnx.Rngs(0))
  backbone.eval()
  changed = changed_frames(backbone, videos, video_index=0, frame_index=5)
  expected = np.zeros((2, 8), dtype=bool)
  expected[0, 5] = True
  np.testing.assert_array_equal(changed, expected)


def test_bfloat16_compute_float32_params(videos, tiny_backbones):
  backbone = backbones.get_backbone("tsm_tiny", dtype="bfloat16", rngs=nnx.Rngs(0))
  frame_features = jit_apply(backbone)(videos)
  assert frame_features.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(backbone, nnx.Param))} == {
      np.dtype(np.float32)}


def test_get_backbone_unknown_name_lists_choices():
  with pytest.raises(ValueError, match="r3d50.*tsm50|tsm50.*r3d50"):
    backbones.get_backbone("resnet18", rngs=nnx.Rngs(0))


def test_bn_axis_name_reaches_every_batch_norm():
  backbone = nnx.eval_shape(lambda: backbones.get_backbone(
      "r3d_tiny", bn_axis_name="data", bn_momentum=0.8, rngs=nnx.Rngs(0)))
  norms = [m for _, m in nnx.iter_modules(backbone) if isinstance(m, nnx.BatchNorm)]
  assert len(norms) == 1 + 4 * 4  # stem + (3 in branch + 1 shortcut) per block
  assert all(n.axis_name == "data" and n.momentum == 0.8 and n.epsilon == 1e-5 for n in norms)


def test_every_parameter_gets_a_gradient(videos, tiny_backbones):
  # Catches non-differentiable ops (e.g. a max-pool JAX cannot transpose).
  backbone = tiny_backbones["r3d_tiny"]  # eval mode, non-zero residual init
  graphdef, params, batch_stats = nnx.split(backbone, nnx.Param, ...)

  def loss_fn(params, inputs):
    frame_features = nnx.merge(graphdef, params, batch_stats)(inputs)
    return jnp.mean(frame_features**2)

  grads = jax.jit(jax.grad(loss_fn))(params, videos[:1, :4])
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  for path, grad in leaves:
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0, jax.tree_util.keystr(path)


# --- Max-pool with its custom gradient ------------------------------------------------

@pytest.mark.parametrize("shape, window, stride", [
    ((2, 3, 9, 8, 4), 3, 2), ((1, 2, 8, 7, 3), 3, 2), ((1, 2, 7, 7, 2), 3, 1),
    ((1, 1, 10, 9, 2), 5, 3), ((1, 1, 5, 6, 2), 1, 2)])
def test_max_pool_values_and_gradient_match_reduce_window(shape, window, stride):
  # Distinct values (a shuffled ramp): no ties, so the gradient is unique.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32) / 7.0)
  pooled = layers.max_pool_spatial(x, window, stride)
  expected = reduce_window_max_pool(x, window, stride)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(expected))
  cotangent = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
  grad = jax.grad(lambda v: jnp.sum(layers.max_pool_spatial(v, window, stride) * cotangent))
  grad_reference = jax.grad(lambda v: jnp.sum(reduce_window_max_pool(v, window, stride)
                                              * cotangent))
  np.testing.assert_allclose(np.asarray(jax.jit(grad)(x)), np.asarray(grad_reference(x)),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_on_ties_goes_to_first_maximum_once():
  # All-equal input: each output's gradient lands on the first (top-left) input of its
  # window, exactly once, as with reduce_window's select-and-scatter.
  x = jnp.zeros((1, 1, 4, 4, 1))
  grad = np.asarray(jax.grad(lambda v: jnp.sum(layers.max_pool_spatial(v)))(x))[0, 0, :, :, 0]
  reference = np.asarray(jax.grad(lambda v: jnp.sum(reduce_window_max_pool(v)))(x))[0, 0, :, :, 0]
  np.testing.assert_array_equal(grad, reference)
  assert grad.sum() == 4  # 2x2 outputs, each gradient 1, none lost or duplicated
  with pytest.raises(ValueError, match="window"):
    layers.max_pool_spatial(x, window=0)


# --- The block-end ReLU's gradient from its output ------------------------------------

def test_block_relu_gradient_from_output_keeps_fewer_residuals_same_gradients():
  # Autodiff's ReLU keeps a mask of its input (the sum residual + shortcut) for the
  # backward pass; 'from_output' reads the mask off the block's output, which the next
  # block keeps anyway: one kept tensor fewer per block, and exactly the same gradients.
  videos = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
  results = {}
  for choice in ("from_input", "from_output"):
    backbone = backbones.get_backbone("r3d_tiny", dtype=jnp.float32,
                                      block_relu_gradient=choice, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)

    def loss_fn(params, graphdef=graphdef, rest=rest):
      return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(videos) ** 2)

    # The vjp function is a pytree of the kept residuals: returned from one jit, applied
    # in another (eager, the test took 35 s).
    loss, vjp_fn = jax.jit(lambda p, loss_fn=loss_fn: jax.vjp(loss_fn, p))(params)
    residuals = [leaf for leaf in jax.tree.leaves(vjp_fn) if leaf.ndim == 5]
    grads = jax.jit(lambda f, c: f(c)[0])(vjp_fn, jnp.ones_like(loss))
    results[choice] = (loss, grads, residuals)
  (loss_in, grads_in, kept_in), (loss_out, grads_out, kept_out) = results.values()
  assert float(loss_in) == float(loss_out)
  for a, b in zip(jax.tree.leaves(grads_in), jax.tree.leaves(grads_out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  num_blocks = 4  # r3d_tiny: one block per stage
  assert len(kept_in) - len(kept_out) == num_blocks
  with pytest.raises(ValueError, match="block_relu_gradient"):
    backbones.get_backbone("r3d_tiny", block_relu_gradient="maybe", rngs=nnx.Rngs(0))
