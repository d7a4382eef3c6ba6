"""BatchNorm folded into a 1x1 conv (tcvm_jax/folded_batch_norm.py, model.bn_fold) against
the conv followed by BatchNorm, differentiated by JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from tcvm_jax import backbones, folded_batch_norm, layers, model as model_lib
from train_test_utils import REPO_ROOT, run_json_child

EPS = 1e-5


def reference(rows, kernel, scale, bias):
  """The conv as a matmul, then flax's training BatchNorm arithmetic: (z, mean, var)."""
  y = rows.astype(jnp.float32) @ kernel.astype(jnp.float32)
  mean = y.mean(0)
  var = jnp.maximum(0.0, (y * y).mean(0) - mean * mean)
  return (y - mean) * (jax.lax.rsqrt(var + EPS) * scale) + bias, mean, var


def folded(rows, kernel, scale, bias, out_dtype=jnp.float32):
  return folded_batch_norm.conv1x1_batch_norm(rows, kernel, scale, bias, EPS, None, out_dtype)


def _inputs(rows, in_features, out_features, seed=0, input_mean=0.5):
  rng = np.random.default_rng(seed)
  # Post-ReLU-like inputs (non-negative, mean ~ std), as a bottleneck's conv_c sees.
  x = np.maximum(rng.normal(input_mean, 1.0, (rows, in_features)), 0.0)
  return (jnp.asarray(x, jnp.float32),
          jnp.asarray(rng.normal(size=(in_features, out_features)) / np.sqrt(in_features),
                      jnp.float32),
          jnp.asarray(rng.uniform(0.5, 1.5, out_features), jnp.float32),
          jnp.asarray(rng.normal(size=out_features), jnp.float32),
          [jnp.asarray(rng.normal(size=s), jnp.float32)
           for s in ((rows, out_features), (out_features,), (out_features,))])


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _loss_and_grads(norm, weights):
  w_z, w_mean, w_var = weights

  def loss(*args):
    z, mean, var = norm(*args)
    # Non-linear in z; the mean and variance outputs get cotangents too.
    return (jnp.sum(jnp.sin(z.astype(jnp.float32)) * w_z) + jnp.sum(mean * w_mean)
            + jnp.sum(var * w_var))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("rows,in_features,out_features", [(300, 8, 32), (97, 16, 32),
                                                           (64, 24, 8)])
def test_values_and_all_gradients_match_conv_then_batch_norm(rows, in_features,
                                                             out_features):
  x, kernel, scale, bias, weights = _inputs(rows, in_features, out_features)
  for out, ref in zip(jax.jit(folded)(x, kernel, scale, bias),
                      reference(x, kernel, scale, bias)):
    assert _relative_error(out, ref) < 2e-6
  value, grads = _loss_and_grads(folded, weights)(x, kernel, scale, bias)
  ref_value, ref_grads = _loss_and_grads(reference, weights)(x, kernel, scale, bias)
  assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
  for name, grad, ref in zip(("x", "kernel", "scale", "bias"), grads, ref_grads):
    assert grad.shape == ref.shape and grad.dtype == ref.dtype
    assert _relative_error(grad, ref) < 1e-5, name


@pytest.mark.parametrize("input_mean", [5.0, 20.0])
def test_inputs_far_from_zero_as_accurate_as_batch_norm_itself(input_mean):
  # Channel means well above the spread: the variance's cancellation moves from y to x's
  # covariance. Against float64 NumPy, the folded op's error stays within 3x of what
  # BatchNorm's own float32 arithmetic (the reference) makes.
  x, kernel, scale, bias, _ = _inputs(256, 8, 16, seed=3, input_mean=input_mean)
  y = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  mean, var = y.mean(0), y.var(0)
  exact = ((y - mean) / np.sqrt(var + EPS) * np.asarray(scale, np.float64)
           + np.asarray(bias, np.float64), mean, var)
  errors = [[_relative_error(out, ref) for out, ref in zip(outputs, exact)]
            for outputs in (jax.jit(folded)(x, kernel, scale, bias),
                            reference(x, kernel, scale, bias))]
  for folded_error, batch_norm_error in zip(*errors):
    assert folded_error <= 3 * batch_norm_error + 1e-6, errors


def plain_bfloat16(rows, kernel, scale, bias):
  """What the step computes without folding: the conv's y rounded to bf16, then
  BatchNorm's closed form (float32 statistics, bf16 output)."""
  y = rows @ kernel
  return layers.batch_norm_train(y, scale, bias, EPS, None, jnp.bfloat16)


@pytest.mark.parametrize("input_mean", [0.5, 3.0])
def test_bfloat16_errors_match_conv_then_batch_norm(input_mean):
  # Both against the float32 reference on the same bf16 inputs: the folded op may not be
  # less accurate than what it replaces (it was 2-3x worse while it folded the gain into
  # the weights before the matmul, at input means 3x the spread).
  x, kernel, scale, bias, weights = _inputs(2048, 32, 128, seed=1, input_mean=input_mean)
  x16, kernel16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  z, mean, var = jax.jit(folded, static_argnums=4)(x16, kernel16, scale, bias, jnp.bfloat16)
  assert z.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
  outputs = {"folded": (z, mean, var), "plain": jax.jit(plain_bfloat16)(x16, kernel16, scale,
                                                                          bias)}
  grads = {"folded": _loss_and_grads(lambda *a: folded(*a, jnp.bfloat16), weights)(
               x16, kernel16, scale, bias)[1],
           "plain": _loss_and_grads(plain_bfloat16, weights)(x16, kernel16, scale, bias)[1]}
  ref_outputs = reference(x16, kernel16, scale, bias)
  _, ref_grads = _loss_and_grads(reference, weights)(x16, kernel16, scale, bias)
  assert [g.dtype for g in grads["folded"]] == [g.dtype for g in grads["plain"]] == [
      jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
  errors = {name: [_relative_error(a, b) for a, b in zip(
      (*outputs[name], *grads[name]), (*ref_outputs, *ref_grads))] for name in outputs}
  assert max(errors["plain"]) < 3e-2, errors  # bf16 at all
  # 1.5x: the input gradient's two matmuls each round to bf16 before their sum, one
  # rounding more than the plain path's (a bf16 ulp is 0.4-0.8 % of these maxima).
  for folded_error, plain_error in zip(errors["folded"], errors["plain"]):
    assert folded_error <= 1.5 * plain_error + 1e-5, errors


_SHARDED_CHILD = """
import json, sys
import jax, jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import test_folded_batch_norm as t
from tcvm_jax import folded_batch_norm
mesh = Mesh(np.array(jax.devices()), ("data",))
x, kernel, scale, bias, (w_z, _, _) = t._inputs(40, 8, 16)

def sharded(x, kernel, scale, bias):
  return jax.shard_map(
      lambda x: folded_batch_norm.conv1x1_batch_norm(x, kernel, scale, bias, t.EPS, "data",
                                                     jnp.float32)[0],
      mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)

def whole(x, kernel, scale, bias):
  return t.reference(x, kernel, scale, bias)[0]

def grads(norm):
  return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(norm(*a)) * w_z),
                          argnums=(0, 1, 2, 3)))(x, kernel, scale, bias)

print(json.dumps({"devices": len(jax.devices()),
                  "values": t._relative_error(jax.jit(sharded)(x, kernel, scale, bias),
                                              whole(x, kernel, scale, bias)),
                  "grads": [t._relative_error(a, b)
                            for a, b in zip(grads(sharded), grads(whole))]}))
"""


def test_statistics_and_gradients_cover_all_devices_of_axis_name():
  """Inside shard_map over 2 devices, the halves of the batch normalise together and the
  kernel's gradient sums both halves: the values and gradients of the whole batch."""
  errors = run_json_child(_SHARDED_CHILD, 2, f"{REPO_ROOT}/tests")
  assert errors["devices"] == 2
  assert errors["values"] < 1e-5 and max(errors["grads"]) < 1e-5, errors


_JIT_SHARDED_CHILD = """
import json, sys
import jax, jax.numpy as jnp
import numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
import test_folded_batch_norm as t
from tcvm_jax import backbones, mesh as mesh_lib
model = backbones.get_backbone("r3d_tiny", bn_fold="widening_2x", rngs=nnx.Rngs(0))
t._random_batch_norms(model)
graph, state = nnx.split(model)
videos = jnp.asarray(np.random.default_rng(8).normal(size=(8, 2, 32, 32, 3)), jnp.float32)

def loss(state, videos):
  return jnp.sum(jnp.sin(nnx.merge(graph, state)(videos)))

step = jax.jit(jax.value_and_grad(loss))
one = jax.device_get(step(state, videos))
mesh = mesh_lib.create_mesh()
split = jax.device_put(videos, mesh_lib.batch_sharding(mesh))
four = jax.device_get(step(state, split))
print(json.dumps({"devices": len(jax.devices()),
                  "errors": [t._relative_error(a, b) for a, b in
                             zip(jax.tree.leaves(four), jax.tree.leaves(one))]}))
"""


def test_jit_over_a_batch_sharded_mesh_matches_one_device():
  """Under plain jit with the batch split over 4 devices (bn_axis_name None: XLA
  partitions the Gram and weight-gradient matmuls), the folded backbone's loss and
  gradients are those of one device."""
  report = run_json_child(_JIT_SHARDED_CHILD, 4, f"{REPO_ROOT}/tests")
  assert report["devices"] == 4
  assert max(report["errors"]) < 1e-4, report


def _conv_and_norm(in_features, out_features, stride, dtype=None):
  conv = layers.VideoConv(in_features, out_features, (1, 1, 1), stride=stride, dtype=dtype,
                          rngs=nnx.Rngs(0))
  norm = layers.batch_norm(out_features, dtype=dtype, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(4)
  norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, out_features), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=out_features), jnp.float32)
  return conv, norm


@pytest.mark.parametrize("stride", [1, 2])
def test_module_method_trains_and_evaluates_like_conv_then_batch_norm(stride):
  x = jnp.asarray(np.maximum(np.random.default_rng(5).normal(0.3, 1.0, (2, 3, 6, 6, 8)), 0),
                  jnp.float32)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 6 // stride, 6 // stride,
                                                              32)), jnp.float32)
  results = {}
  for name, apply in (("plain", lambda conv, norm, x: norm(conv(x))),
                      ("folded", lambda conv, norm, x: norm.conv1x1_folded(conv, x))):
    conv, norm = _conv_and_norm(8, 32, stride)

    def loss(modules, x, apply=apply):
      return jnp.sum(jnp.sin(apply(*modules, x)) * weights)
    value, (grads, x_grad) = nnx.value_and_grad(loss, argnums=(0, 1))((conv, norm), x)
    norm.use_running_average = True
    results[name] = (value, grads, x_grad, norm.mean[...], norm.var[...],
                     apply(conv, norm, x))
  (value, grads, x_grad, mean, var, evaluated), ref = results["folded"], results["plain"]
  assert float(value) == pytest.approx(float(ref[0]), rel=1e-5)
  assert _relative_error(x_grad, ref[2]) < 1e-5
  for leaf, ref_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1])):
    assert _relative_error(leaf, ref_leaf) < 1e-5
  # The running averages moved as BatchNorm's own, and evaluation is the plain path.
  np.testing.assert_allclose(mean, ref[3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, ref[4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(mean, 0.0)
  np.testing.assert_allclose(evaluated, ref[5], rtol=1e-6, atol=1e-6)


def test_module_method_folds_on_the_named_platform_only():
  """`platform`: the fold in that platform's program, conv then BatchNorm in the others'
  (model.bn_fold 'auto' on CUDA). On this CPU, platform='cpu' must train exactly as the
  unconditional fold and platform='cuda' exactly as the plain path, running averages
  included (they are updated outside the per-platform branches)."""
  x = jnp.asarray(np.maximum(np.random.default_rng(5).normal(0.3, 1.0, (2, 3, 6, 6, 8)), 0),
                  jnp.float32)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, 3, 32)), jnp.float32)
  applies = {
      "plain": lambda conv, norm, x: norm(conv(x)),
      "folded": lambda conv, norm, x: norm.conv1x1_folded(conv, x),
      "folded_on_cpu": lambda conv, norm, x: norm.conv1x1_folded(conv, x, platform="cpu"),
      "folded_on_cuda": lambda conv, norm, x: norm.conv1x1_folded(conv, x, platform="cuda"),
  }
  results = {}
  for name, apply in applies.items():
    conv, norm = _conv_and_norm(8, 32, stride=2)

    def loss(modules, x, apply=apply):
      return jnp.sum(jnp.sin(apply(*modules, x)) * weights)
    value, grads = nnx.value_and_grad(loss, argnums=(0, 1))((conv, norm), x)
    results[name] = jax.tree.map(np.asarray, (value, grads, norm.mean[...], norm.var[...]))
  # The fold rounds differently from the plain path, so the pairs below are told apart.
  assert not np.array_equal(results["folded"][0], results["plain"][0])
  for name, same_as in (("folded_on_cpu", "folded"), ("folded_on_cuda", "plain")):
    for leaf, ref in zip(jax.tree.leaves(results[name]), jax.tree.leaves(results[same_as])):
      np.testing.assert_array_equal(leaf, ref, err_msg=name)
  conv, norm = _conv_and_norm(8, 32, stride=1)
  norm.gradient = "autodiff"  # flax's BatchNorm: its statistics are not returned
  with pytest.raises(ValueError, match="autodiff"):
    norm.conv1x1_folded(conv, x, platform="cuda")


def test_module_method_rejects_wider_kernels():
  conv = layers.VideoConv(8, 16, (1, 3, 3), rngs=nnx.Rngs(0))
  norm = layers.batch_norm(16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="1, 1, 1"):
    norm.conv1x1_folded(conv, jnp.zeros((1, 2, 4, 4, 8)))


def _random_batch_norms(model):
  # zero_init_residual starts every bn_c at 0, which would hide conv_c's values.
  rng = np.random.default_rng(7)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, layers.BatchNorm):
      module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, module.scale.shape), jnp.float32)
      module.bias[...] = jnp.asarray(0.3 * rng.normal(size=module.bias.shape), jnp.float32)


# The last case is gpu_session.sh's third A/B variant: with the block-end ReLU's gradient
# taken from its output, the fold's gradient must still be autodiff's of the plain path.
@pytest.mark.parametrize("name,relu_gradient", [("r3d_tiny", "auto"), ("tsm_tiny", "auto"),
                                                ("r3d_tiny", "from_output")])
def test_backbone_trains_the_same_folded(name, relu_gradient):
  videos = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 32, 32, 3)), jnp.float32)
  results = []
  for fold, block_relu_gradient in (("none", "auto"), ("widening_2x", relu_gradient)):
    model = backbones.get_backbone(name, bn_fold=fold, block_relu_gradient=block_relu_gradient,
                                   rngs=nnx.Rngs(0))
    _random_batch_norms(model)
    loss = lambda model: jnp.sum(jnp.sin(model(videos)))
    value, grads = nnx.value_and_grad(loss)(model)
    results.append((value, dict(nnx.to_flat_state(grads)),
                    dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))))
  (ref_value, ref_grads, ref_stats), (value, grads, stats) = results
  assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
  assert grads.keys() == ref_grads.keys()
  for key, ref in ref_grads.items():
    assert _relative_error(grads[key][...], ref[...]) < 1e-4, key
  for key, ref in ref_stats.items():
    np.testing.assert_allclose(stats[key][...], ref[...], rtol=1e-4, atol=1e-5)


def _folded_convs(monkeypatch, bn_fold, **options):
  """(in, out) of every conv that R3D50's forward pass runs with its BatchNorm folded (on
  some platform: every platform's branch is traced)."""
  calls = []
  original = folded_batch_norm.conv1x1_batch_norm

  def recording(rows, kernel, *args):
    calls.append(kernel.shape)
    return original(rows, kernel, *args)
  monkeypatch.setattr(folded_batch_norm, "conv1x1_batch_norm", recording)
  model = nnx.eval_shape(lambda: backbones.get_backbone("r3d50", bn_fold=bn_fold,
                                                        rngs=nnx.Rngs(0), **options))
  graph, state = nnx.split(model)
  jax.eval_shape(lambda state, videos: nnx.merge(graph, state)(videos), state,
                 jax.ShapeDtypeStruct((1, 2, 64, 64, 3), jnp.float32))
  return sorted(calls)


def test_r3d50_folds_the_widening_convs_and_only_those(monkeypatch):
  # By hand: each block's conv_c widens 4x (3, 4, 6, 3 blocks), stage 1's projection
  # shortcut too (64 -> 256), the other stages' 2x (256 -> 512 ...); conv_a narrows.
  conv_c = [(64, 256)] * 3 + [(128, 512)] * 4 + [(256, 1024)] * 6 + [(512, 2048)] * 3
  assert _folded_convs(monkeypatch, "widening_4x") == sorted(conv_c + [(64, 256)])
  assert _folded_convs(monkeypatch, "widening_2x") == sorted(
      conv_c + [(64, 256), (256, 512), (512, 1024), (1024, 2048)])
  assert _folded_convs(monkeypatch, "auto") == _folded_convs(monkeypatch, "none") == []


def _lowered_backbone_gradient(platform, **options):
  """StableHLO of r3d_tiny's gradient for `platform`."""
  graph, state = nnx.split(backbones.get_backbone("r3d_tiny", rngs=nnx.Rngs(0), **options))
  loss = lambda state, videos: jnp.sum(nnx.merge(graph, state)(videos))
  videos = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32)
  return jax.jit(jax.grad(loss)).trace(state, videos).lower(
      lowering_platforms=(platform,)).as_text()


def test_auto_folds_on_cuda_only_what_cuda_auto_bn_fold_names(monkeypatch):
  # How 'auto' becomes a fold once a GPU A/B picks one: CUDA_AUTO_BN_FOLD (now 'none').
  monkeypatch.setattr(backbones, "CUDA_AUTO_BN_FOLD", "widening_4x")
  assert _folded_convs(monkeypatch, "auto") == _folded_convs(monkeypatch, "widening_4x")
  # Not where a Pallas kernel takes the 1x1 convs, nor with flax's own BatchNorm.
  assert _folded_convs(monkeypatch, "auto", conv1x1_kernel="pallas") == []
  assert _folded_convs(monkeypatch, "auto", bn_gradient="autodiff") == []
  # Each platform's program: the Gram and backward matmuls on CUDA only.
  def matmuls(platform, bn_fold):
    return _lowered_backbone_gradient(platform, bn_fold=bn_fold).count("stablehlo.dot_general")
  assert matmuls("cuda", "auto") == matmuls("cuda", "widening_4x") > matmuls("cuda", "none")
  assert matmuls("cpu", "auto") == matmuls("cpu", "none") < matmuls("cpu", "widening_4x")


def test_config_field_reaches_every_block():
  config = pretrain.get_config("demo")
  config.model.bn_fold = "widening_4x"
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, backbones.Bottleneck)]
  assert config.model.backbone == "r3d_tiny" and len(blocks) == 4  # a block per stage
  assert all(block.bn_fold == "widening_4x" for block in blocks)


def test_bad_choices_are_named():
  with pytest.raises(ValueError, match="model.bn_fold"):
    backbones.get_backbone("r3d_tiny", bn_fold="all", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="conv1x1_kernel"):
    backbones.get_backbone("r3d_tiny", bn_fold="widening_4x", conv1x1_kernel="pallas",
                           rngs=nnx.Rngs(0))
