"""layers.BatchNorm's closed-form gradient (batch_norm_train) against flax's BatchNorm +
autodiff."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tcvm_jax import layers
from train_test_utils import run_json_child, variadic_reductions

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

EPS = 1e-5


def reference_batch_norm(x, scale, bias):
  """flax's training arithmetic, differentiated by JAX: (y, mean, var)."""
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  mean = rows.mean(0)
  var = jnp.maximum(0.0, (rows * rows).mean(0) - mean * mean)
  y = (rows - mean) * (jax.lax.rsqrt(var + EPS) * scale) + bias
  return y.reshape(x.shape), mean, var


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  features = shape[-1]
  return (jnp.asarray(rng.normal(1.5, 2.0, shape), jnp.float32),
          jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32),
          jnp.asarray(rng.normal(size=features), jnp.float32),
          [jnp.asarray(rng.normal(size=s), jnp.float32)
           for s in (shape, (features,), (features,))])


def _relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("one_reduction", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5, 8), (64, 16), (2, 7, 3)])
def test_values_and_all_gradients_match_autodiff(shape, one_reduction):
  x, scale, bias, (w_y, w_mean, w_var) = _inputs(shape)

  def loss(norm):
    def fn(x, scale, bias):
      y, mean, var = norm(x, scale, bias)
      # The mean and variance outputs get cotangents too (the step never sends any).
      return (jnp.sum(jax.nn.relu(y) * w_y) + jnp.sum(mean * w_mean)
              + jnp.sum(var * w_var))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

  closed_form = lambda x, s, b: layers.batch_norm_train(x, s, b, EPS, None, jnp.float32,
                                                        one_reduction)
  # What 'auto' differentiates off the CPU: the same forward ops, autodiff's gradient.
  plain_ops = lambda x, s, b: layers._batch_norm_train_forward(  # pylint: disable=protected-access
      x, s, b, EPS, None, jnp.float32, one_reduction)[:3]
  ref_value, ref_grads = loss(reference_batch_norm)(x, scale, bias)
  for norm in (closed_form, plain_ops):
    value, grads = loss(norm)(x, scale, bias)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for grad, ref in zip(grads, ref_grads):
      assert _relative_error(grad, ref) < 1e-5
  outputs = jax.jit(closed_form)(x, scale, bias)
  for out, ref in zip(outputs, reference_batch_norm(x, scale, bias)):
    assert _relative_error(out, ref) < 1e-6


def _modules(dtype, gradient="closed_form"):
  """nnx.BatchNorm and layers.batch_norm(gradient=...), with the same random scale/bias."""
  features = 8
  flax_bn = nnx.BatchNorm(features, momentum=0.9, epsilon=EPS, dtype=dtype,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ours = layers.batch_norm(features, dtype=dtype, gradient=gradient, rngs=nnx.Rngs(0))
  for module in (flax_bn, ours):
    rng = np.random.default_rng(1)  # the same values for both
    module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32)
    module.bias[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
  return flax_bn, ours


def _train_loss(module, x, weights):
  return jnp.sum(jax.nn.relu(module(x, use_running_average=False)).astype(jnp.float32)
                 * weights)


@pytest.mark.parametrize("dtype,tolerance", [(None, 1e-5), (jnp.bfloat16, 2e-2)])
def test_module_trains_like_nnx_batch_norm(dtype, tolerance):
  flax_bn, closed = _modules(dtype)
  assert isinstance(closed, nnx.BatchNorm) and type(flax_bn) is nnx.BatchNorm
  x = jnp.asarray(np.random.default_rng(2).normal(0.5, 3.0, (6, 4, 4, 8)), jnp.float32)
  if dtype is not None:
    x = x.astype(dtype)
  weights = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

  results = []
  for module in (flax_bn, closed):
    value, (module_grads, x_grad) = nnx.value_and_grad(_train_loss, argnums=(0, 1))(
        module, x, weights)
    results.append((value, module_grads, x_grad, module))
  (ref_value, ref_grads, ref_x_grad, ref_module), (value, grads, x_grad, module) = results
  assert float(value) == pytest.approx(float(ref_value), rel=tolerance)
  assert x_grad.dtype == ref_x_grad.dtype
  assert _relative_error(x_grad.astype(jnp.float32), ref_x_grad.astype(jnp.float32)) < tolerance
  for name in ("scale", "bias"):
    assert _relative_error(grads[name][...], ref_grads[name][...]) < tolerance
  # The running statistics moved the same way (float32 statistics in both).
  for name in ("mean", "var"):
    np.testing.assert_allclose(getattr(module, name)[...], getattr(ref_module, name)[...],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(getattr(module, name)[...], 0.0 if name == "mean" else 1.0)
  # Evaluation goes through flax's own path with those (float-rounding close) statistics.
  out, ref_out = module(x, use_running_average=True), ref_module(x, use_running_average=True)
  assert out.dtype == ref_out.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             rtol=tolerance, atol=tolerance)


_SHARDED_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import test_batch_norm as t
from tcvm_jax import layers
mesh = Mesh(np.array(jax.devices()), ("data",))
x, scale, bias, (w_y, _, _) = t._inputs((20, 3, 4))

def sharded(x, scale, bias):
  return jax.shard_map(
      lambda x: layers.batch_norm_train(x, scale, bias, t.EPS, "data", jnp.float32)[0],
      mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)

def whole(x, scale, bias):
  return t.reference_batch_norm(x, scale, bias)[0]

def grads(norm):
  return jax.jit(jax.grad(lambda *a: jnp.sum(jax.nn.relu(norm(*a)) * w_y),
                          argnums=(0, 1, 2)))(x, scale, bias)

print(json.dumps({"devices": len(jax.devices()),
                  "values": t._relative_error(jax.jit(sharded)(x, scale, bias),
                                              whole(x, scale, bias)),
                  "grads": [t._relative_error(a, b)
                            for a, b in zip(grads(sharded), grads(whole))]}))
"""


def test_statistics_and_gradients_cover_all_devices_of_axis_name():
  """Inside shard_map over 2 devices (axis_name 'data'), the two halves of the batch
  normalise together: the values and gradients of one BatchNorm over the whole batch."""
  errors = run_json_child(_SHARDED_CHILD, 2, TESTS_DIR)
  assert errors["devices"] == 2
  assert errors["values"] < 1e-5 and max(errors["grads"]) < 1e-5, errors


def test_auto_is_the_closed_form_on_cpu_and_autodiff_is_flax():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 6, 8)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
  grad = lambda module: nnx.grad(_train_loss, argnums=(0, 1))(module, x, weights)
  results = {}
  for gradient in layers.BATCH_NORM_GRADIENTS:
    flax_bn, ours = _modules(None, gradient)
    results[gradient] = grad(ours)
    if gradient == "autodiff":
      results["flax"] = grad(flax_bn)
  for a, b in (("auto", "closed_form"), ("autodiff", "flax")):  # bit for bit on this CPU
    assert jax.devices()[0].platform == "cpu"
    for leaf_a, leaf_b in zip(jax.tree.leaves(results[a]), jax.tree.leaves(results[b])):
      np.testing.assert_array_equal(leaf_a, leaf_b)


def test_unknown_gradient_is_an_error_listing_the_choices():
  with pytest.raises(ValueError, match="closed_form"):
    layers.batch_norm(4, gradient="fast", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one_reduction"):
    layers.batch_norm(4, statistics="fast", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="autodiff"):
    layers.batch_norm(4, gradient="autodiff", statistics="one_reduction", rngs=nnx.Rngs(0))


def test_one_reduction_computes_each_pair_of_sums_in_one_variadic_reduce():
  x, scale, bias, (w_y, _, _) = _inputs((6, 5, 8))
  forward = {flag: lambda x, s, b, flag=flag: layers.batch_norm_train(
      x, s, b, EPS, None, jnp.float32, flag)[0] for flag in (False, True)}
  separate = jax.jit(forward[False]).lower(x, scale, bias).as_text()
  variadic = jax.jit(forward[True]).lower(x, scale, bias).as_text()
  # Two reductions of one input each, against one reduction of two inputs (x and x^2).
  assert separate.count("stablehlo.reduce(") == 2
  assert variadic.count("stablehlo.reduce(") == 1
  assert variadic_reductions(variadic) == 1  # two results
  backward = jax.jit(jax.grad(lambda x: jnp.sum(forward[True](x, scale, bias) * w_y)))
  # The closed-form gradient's two sums (dy, dy * (x - mean)) too: one more reduction.
  assert backward.lower(x).as_text().count("stablehlo.reduce(") == 2


def test_module_statistics_one_reduction_trains_like_separate():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 6, 8)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)
  for gradient in ("auto", "closed_form"):
    results = []
    for statistics in ("separate", "one_reduction"):
      module = layers.batch_norm(8, gradient=gradient, statistics=statistics,
                                 rngs=nnx.Rngs(0))
      value, grads = nnx.value_and_grad(_train_loss, argnums=(0, 1))(module, x, weights)
      results.append((value, grads, module.mean[...], module.var[...]))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _variadic_reductions(gradient, statistics, platform):
  """Two-result reductions in one training step of a BatchNorm lowered for `platform`."""
  module = layers.batch_norm(8, gradient=gradient, statistics=statistics, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 5, 8)), jnp.float32)

  def step(x, state):
    module = nnx.merge(graphdef, state)
    return nnx.grad(lambda m: jnp.sum(m(x, use_running_average=False) ** 2))(module)

  return variadic_reductions(
      jax.jit(step).trace(x, state).lower(lowering_platforms=(platform,)).as_text())


@pytest.mark.parametrize("gradient", ["auto", "closed_form"])
def test_auto_statistics_take_one_reduction_on_cuda_only(gradient):
  # Lowered for each platform from this CPU: 'auto' is one_reduction on CUDA (measured
  # faster there), separate on CPU and TPU; explicit choices hold on every platform.
  assert _variadic_reductions(gradient, "auto", "cuda") >= 1
  assert _variadic_reductions(gradient, "auto", "cpu") == 0
  assert _variadic_reductions(gradient, "auto", "tpu") == 0
  assert _variadic_reductions(gradient, "separate", "cuda") == 0
  assert _variadic_reductions(gradient, "one_reduction", "cpu") >= 1
  assert _variadic_reductions(gradient, "one_reduction", "tpu") >= 1
