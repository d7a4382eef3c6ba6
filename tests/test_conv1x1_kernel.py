"""The fused 1x1 conv kernel (BatchNorm + ReLU in front, the output's per-channel sums
behind; Pallas, run by its interpreter on this CPU) against NumPy, its XLA reference and
autodiff; and the backbones with `model.conv1x1_kernel='pallas'` against 'xla'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from tcvm_jax import backbones, config_validation, conv1x1_kernel as ck, layers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Several tiles along rows and output channels, several steps along the input channels.
SMALL = ck.Tiling(block_m=32, block_n=32, block_k=16)


def random_inputs(seed, rows, in_features, out_features, dtype):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(rows, in_features)), dtype)
  w = jnp.asarray(rng.normal(size=(in_features, out_features)) / np.sqrt(in_features), dtype)
  affine = ck.Affine(jnp.asarray(rng.normal(1.0, 0.5, size=in_features), jnp.float32),
                     jnp.asarray(rng.uniform(0.2, 1.0, size=in_features), jnp.float32),
                     jnp.asarray(rng.normal(0.0, 0.5, size=in_features), jnp.float32))
  return x, w, affine


def numpy_forward(x, w, affine):
  """BatchNorm's affine in float32, rounded to bfloat16, ReLU, then the matmul in float64."""
  x = np.asarray(x, np.float32)
  if affine is not None:
    mean, gain, bias = (np.asarray(v, np.float32) for v in affine)
    z = ((x - mean) * gain + bias).astype(ml_dtypes.bfloat16).astype(np.float64)
    x = np.maximum(z, 0.0)
  return x.astype(np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("with_affine", [False, True])
def test_kernel_matches_numpy_and_sums_its_own_output(with_affine):
  x, w, affine = random_inputs(0, 128, 64, 96, jnp.bfloat16)
  affine = affine if with_affine else None
  y, total, total_sq = jax.jit(lambda x, w, a: ck.conv1x1_stats_kernel(
      x, w, a, tiling=SMALL, interpret=True))(x, w, affine)
  assert y.shape == (128, 96) and y.dtype == jnp.bfloat16
  assert total.shape == total_sq.shape == (96,) and total.dtype == jnp.float32
  want = numpy_forward(x, w, affine)
  got = np.asarray(y, np.float64)
  # y is the float32 accumulation rounded once to bfloat16 (8 bits of mantissa).
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-3)
  # The sums are of the values it stored, as a BatchNorm over y computes them.
  np.testing.assert_allclose(np.asarray(total), got.sum(axis=0), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(total_sq), (got ** 2).sum(axis=0), rtol=1e-5)
  if with_affine:  # the ReLU ran: some inputs are negative before it, none after
    assert np.any(numpy_forward(x, np.eye(64), affine) == 0)


def test_kernel_equals_the_xla_reference_up_to_accumulation_order():
  x, w, affine = random_inputs(1, 256, 32, 64, jnp.bfloat16)
  got = ck.conv1x1_stats_kernel(x, w, affine, tiling=SMALL, interpret=True)
  want = ck.conv1x1_stats_reference(x, w, affine)
  y_got, y_want = (np.asarray(v, np.float32) for v in (got[0], want[0]))
  # At most one bfloat16 step apart, where the float32 sums round differently.
  assert np.mean(y_got != y_want) < 0.05
  np.testing.assert_allclose(y_got, y_want, rtol=2 ** -7, atol=1e-2)
  for a, b in zip(got[1:], want[1:]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3)


def _loss(conv, x, w, affine, use_sums=True):
  y, total, total_sq = conv(x, w, affine)
  loss = jnp.sum(jnp.sin(y.astype(jnp.float32)))
  if use_sums:
    loss += jnp.sum(total * jnp.linspace(-1.0, 1.0, total.shape[0])) * 1e-2
    loss += jnp.sum(jnp.sqrt(total_sq)) * 1e-1
  return loss


@pytest.mark.parametrize("backward_kernel", [True, False])
@pytest.mark.parametrize("use_sums", [True, False])
@pytest.mark.parametrize("with_affine", [False, True])
def test_gradient_matches_autodiff_of_the_reference(with_affine, use_sums, backward_kernel):
  # In float32 both run the same maths: the custom backward (which recomputes the
  # normalised input, in the input-gradient kernel or by XLA ops, and folds the sums'
  # gradient into y's) against JAX's autodiff of the reference.
  x, w, affine = random_inputs(2, 64, 32, 64, jnp.float32)
  affine = affine if with_affine else None
  kernel = lambda x, w, a: ck.conv1x1_stats(x, w, a, tiling=SMALL, interpret=True,
                                            backward_kernel=backward_kernel)
  argnums = (0, 1, 2) if with_affine else (0, 1)
  grad_fn = jax.grad(lambda *a: _loss(kernel, *a, use_sums=use_sums), argnums=argnums)
  # One kernel forward; the input-gradient kernel only behind bn_b + ReLU.
  calls = str(jax.make_jaxpr(grad_fn)(x, w, affine)).count("pallas_call")
  assert calls == 1 + (backward_kernel and with_affine)
  got = jax.jit(grad_fn)(x, w, affine)
  want = jax.grad(lambda *a: _loss(ck.conv1x1_stats_reference, *a, use_sums=use_sums),
                  argnums=argnums)(x, w, affine)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                               atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_input_gradient_kernel_in_bfloat16_matches_the_xla_backward():
  # bfloat16 as the step runs it: the kernel keeps the normalised input's gradient in
  # float32 until x's gradient is stored, XLA rounds it to bfloat16 once before; both
  # return the same normalised input (the weight gradient's operand) bit for bit.
  x, w, affine = random_inputs(4, 128, 32, 64, jnp.bfloat16)
  grad = jnp.asarray(np.random.default_rng(5).normal(size=(128, 64)), jnp.bfloat16)
  grad_x, z, grad_affine = ck.input_grad_kernel(grad, w, x, affine, tiling=SMALL,
                                                interpret=True)
  want_z, input_vjp = jax.vjp(ck.normalised_input, x, affine)
  want_x, want_affine = input_vjp(jnp.dot(grad, w.T))
  np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(want_z, np.float32))
  scale = float(jnp.max(jnp.abs(want_x.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(grad_x, np.float32), np.asarray(want_x, np.float32),
                             atol=2e-2 * scale)
  for a, b in zip(grad_affine, want_affine):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(b))))


def test_tiling_shrinks_to_the_shapes_and_untileable_shapes_run_the_reference():
  assert ck.kernel_tiling(96, 64, 256) == ck.Tiling(block_m=32, block_n=128, block_k=64)
  assert ck.kernel_tiling(802816, 64, 256, ck.Tiling(block_n=256)).block_n == 256
  assert ck.kernel_tiling(100, 64, 256) is None  # 100 rows: no block of >= 16 divides them
  assert ck.kernel_tiling(128, 8, 32) is None  # 8 input channels: below Triton's dot
  assert ck.kernel_tiling(128, 48, 32) is None  # a tile holds all 48: not a power of two
  x, w, affine = random_inputs(3, 40, 8, 32, jnp.bfloat16)
  with pytest.raises(ValueError, match="No tiling"):
    ck.conv1x1_stats_kernel(x, w, affine, interpret=True)
  for got, want in zip(ck.conv1x1_stats(x, w, affine), ck.conv1x1_stats_reference(x, w, affine)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_layer_checks_its_conv():
  conv = layers.VideoConv(8, 16, (1, 3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(1, 1, 1\) stride-1"):
    layers.conv1x1_with_statistics(conv, jnp.zeros((1, 2, 4, 4, 8)))


# --- The backbones with the fused path (on this CPU: the XLA reference inside it) -------

def _train_step_results(name, choice, videos):
  backbone = backbones.get_backbone(name, dtype=jnp.float32, conv1x1_kernel=choice,
                                    zero_init_residual=False, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss = jnp.sum(jnp.sin(model(videos)))
    return loss, nnx.state(model, nnx.BatchStat)

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  backbone.eval()
  features = jax.jit(lambda v: backbone(v))(videos)
  return loss, grads, stats, features


@pytest.mark.parametrize("name", ["r3d_tiny", "tsm_tiny"])
def test_backbone_fused_path_matches_the_xla_path(name):
  # Same loss, parameter gradients, updated running averages and evaluation features:
  # 'pallas' moves bn_b + ReLU into conv_c's call and takes bn_a's, bn_c's and the
  # shortcut BatchNorm's statistics from their convs' pass. (Random residual-branch
  # scales: with the zero init the branches would add nothing to the loss.)
  videos = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
  xla = _train_step_results(name, "xla", videos)
  fused = _train_step_results(name, "pallas", videos)
  np.testing.assert_allclose(float(fused[0]), float(xla[0]), rtol=1e-5)
  for part in (1, 2, 3):  # gradients, running averages, evaluation features
    leaves_xla, leaves_fused = jax.tree.leaves(xla[part]), jax.tree.leaves(fused[part])
    assert len(leaves_xla) == len(leaves_fused)
    for a, b in zip(leaves_xla, leaves_fused):
      scale = float(jnp.max(jnp.abs(a))) + 1e-6
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * scale)
  # The running averages moved away from their initial values: training mode updated them.
  assert any(float(jnp.max(jnp.abs(v - 1.0))) > 1e-3 for v in jax.tree.leaves(fused[2]))


def _r3d50_kernel_use(choice: str) -> tuple[list, list]:
  """R3D50's (stage, in, out) of the 1x1 convs the forward kernel runs and of those whose
  input gradient the input-gradient kernel computes, under model.conv1x1_kernel=choice."""
  model = nnx.eval_shape(lambda: backbones.get_backbone(
      "r3d50", conv1x1_kernel=choice, rngs=nnx.Rngs(0)))
  forward, backward = [], []
  blocks = [(stage, block) for stage, blocks in enumerate(model.stages, start=1)
            for block in blocks]
  assert len(blocks) == 3 + 4 + 6 + 3
  for stage, block in blocks:
    for conv in (block.conv_a, block.conv_c, block.shortcut_conv):
      if conv is not None and block._fuses(conv):  # pylint: disable=protected-access
        forward.append((stage, conv.in_features, conv.out_features))
    if block._fuses(block.conv_c, backward=True):  # pylint: disable=protected-access
      backward.append((stage, block.conv_c.in_features, block.conv_c.out_features))
  return forward, backward


def test_pallas_fuses_the_memory_bound_convs_and_pallas_all_every_one():
  # By hand: stages 1-2's 1x1 convs (3 + 1 + 1 + 2 and 4 + 1 + 3 calls: conv_c, block 1's
  # conv_a and stage 1's stride-1 shortcut, the other blocks' conv_a) are at most 102
  # FLOPs per byte; stages 3-4's conv_c (256 -> 1024, 512 -> 2048) are 205 and 410 and
  # stay XLA matmuls. Only stage 1's conv_c (51) takes the input-gradient kernel.
  forward, backward = _r3d50_kernel_use("pallas")
  assert len(forward) == 15 and {stage for stage, *_ in forward} == {1, 2}
  assert backward == [(1, 64, 256)] * 3
  forward_all, backward_all = _r3d50_kernel_use("pallas_all")
  assert len(forward_all) == 24 and len(backward_all) == 3 + 4 + 6 + 3
  assert set(forward) < set(forward_all)
  assert _r3d50_kernel_use("auto") == _r3d50_kernel_use("xla") == ([], [])
  assert ck.flops_per_byte(128, 512) == pytest.approx(102.4)


def test_bad_choice_is_named():
  with pytest.raises(ValueError, match="conv1x1_kernel"):
    backbones.get_backbone("r3d_tiny", conv1x1_kernel="cudnn", rngs=nnx.Rngs(0))
  config = get_config("demo")
  config.model.conv1x1_kernel = "cudnn"
  with pytest.raises(config_validation.ConfigError, match="conv1x1_kernel"):
    config_validation.validate_config(config, num_devices=1, check_paths=False,
                                      check_model=False)


# --- benchmarks/conv1x1_variants.py ------------------------------------------------------

def test_benchmark_finds_r3d50s_24_fused_calls():
  # By hand from the architecture (stages of 3, 4, 6, 3 blocks; conv_a (3, 1, 1) in
  # stages 3-4; the stride on conv_b; 1024 frames of 28^2 after the stem at B = 32):
  # every block's conv_c with bn_b in front, conv_a in stages 1-2, and stage 1's
  # stride-1 shortcut.
  from benchmarks import conv1x1_variants
  calls = conv1x1_variants.backbone_calls(get_config(), batch_size=32)
  shape = conv1x1_variants.Shape
  rows = [1024 * side * side for side in (28, 14, 7, 4)]
  assert calls == {
      shape(rows[0], 64, 256, True): 3, shape(rows[1], 128, 512, True): 4,
      shape(rows[2], 256, 1024, True): 6, shape(rows[3], 512, 2048, True): 3,
      shape(rows[0], 64, 64, False): 1, shape(rows[0], 256, 64, False): 2,
      shape(rows[0], 256, 128, False): 1, shape(rows[1], 512, 128, False): 3,
      shape(rows[0], 64, 256, False): 1}
  assert sum(calls.values()) == 24


def test_benchmark_totals_count_calls_and_fall_back_to_xla():
  from benchmarks import conv1x1_variants as cv
  default = cv.tiling_name(ck.Tiling())
  results = [
      {"shape": cv.Shape(1024, 64, 256, True)._asdict(), "count": 3,
       "forward_ms": {"xla": 1.0, default: 0.5, "pallas_other": 0.4},
       "both_ms": {"xla": 3.0, "pallas_other": 2.5,
                   cv.XLA_BACKWARD.format("pallas_other"): 2.75}},
      # No kernel ran here (8 input channels): every variant pays XLA's time.
      {"shape": cv.Shape(1024, 8, 32, False)._asdict(), "count": 2,
       "forward_ms": {"xla": 0.25}, "both_ms": {"xla": 1.0}}]
  totals = cv.per_step_totals(results)
  assert totals["forward:xla"] == 3 * 1.0 + 2 * 0.25
  assert totals["forward:pallas_best"] == 3 * 0.4 + 2 * 0.25
  assert totals[f"forward:{default}"] == 3 * 0.5 + 2 * 0.25
  assert totals["forward+backward:pallas_best"] == 3 * 2.5 + 2 * 1.0
  assert totals["forward+backward:pallas_best_xla_backward"] == 3 * 2.75 + 2 * 1.0


def test_four_devices_split_the_rows_and_add_up_the_sums():
  # Under the step's data-parallel jit a Pallas call is opaque to XLA's partitioner, which
  # would gather x whole on every device; `_split_over_rows` has each device run the
  # kernels on its rows and adds the sums up. Pallas's interpreter, 4 CPU devices,
  # against one device: the same loss and gradients, x's gradient split by rows, no
  # all-gather, the sums all-reduced.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests",
                                                        "multidevice_conv1x1_check.py")],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["num_devices"] == 4
  assert report["max_rel_diff"] < 1e-5
  assert report["x_grad_spec"] == "P('data',)" and report["rows_per_device"] == [256 // 4]
  assert report["largest_all_gather"] == 0 and report["all_reduces"] >= 1


@pytest.mark.parametrize("backward_kernel, triton_calls", [(True, 2), (False, 1)])
def test_the_layer_passes_the_backward_kernel_choice_to_cuda(backward_kernel, triton_calls):
  # conv1x1_with_statistics behind bn_b, differentiated and lowered for CUDA: the forward
  # kernel, and the input-gradient kernel only when asked for ('pallas' leaves it out
  # above 64 FLOPs per byte). On the CPU neither (the XLA reference).
  conv = layers.VideoConv(64, 256, (1, 1, 1), rngs=nnx.Rngs(0))
  x = jnp.ones((2, 4, 8, 8, 64), jnp.bfloat16)
  affine = ck.Affine(jnp.zeros(64), jnp.ones(64), jnp.zeros(64))

  def loss(x):
    y, total, total_sq = layers.conv1x1_with_statistics(
        conv, x, affine, backward_kernel=backward_kernel)
    return y.astype(jnp.float32).sum() + total.sum() + total_sq.sum()

  triton_call = "stablehlo.custom_call @__gpu$xla.gpu.triton"
  lowered = {platform: jax.jit(jax.grad(loss)).trace(x).lower(
      lowering_platforms=(platform,)).as_text() for platform in ("cuda", "cpu")}
  assert lowered["cuda"].count(triton_call) == triton_calls
  assert lowered["cpu"].count(triton_call) == 0
