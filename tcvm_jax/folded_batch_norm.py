"""A 1x1 convolution and the training-mode BatchNorm after it as one op whose statistics
and gradient never read the convolution's output.

For rows x (N, Cin) and weights W (Cin, Cout), y = x W has
  mean(y) = mean(x) W  and  var(y)_c = W_c^T Cov(x) W_c,
so the batch statistics come from x's column sums and its Gram matrix x^T x (Cin x Cin),
and the output is the matmul and one pass that scales and shifts it:
  z = (y - mean) * gain + bias = y * gain + (bias - mean * gain),  gain = scale / std.
The gradient needs neither y nor dL/dy. With g = dL/dz, the BatchNorm backward's two sums
are sum(g) and sum(g * y) = colsum(W * x^T g), and x^T g is the weight gradient's own
matmul; dL/dy = gain * g + u * y + v (per-channel u, v), hence
  dW = (x^T g) * gain + (x^T x W) * u + sum(x)^T v,
  dx = g (W * gain)^T + x (W diag(u) W^T) + v W^T.
What this saves is memory traffic over the wide output: y is written once and read once
(by the pass that normalises it), never for its statistics, never in the backward pass;
dL/dy is never formed. What it costs is the Gram matmul forward and the
x (W diag(u) W^T) matmul backward, Cin / Cout of the convolution's FLOPs each: a quarter
for a bottleneck's conv_c (Cin = Cout / 4), so it is for convs that widen
(`model.bn_fold`, backbones.Bottleneck._folds).

Numerics: the variance is W^T Cov(x) W with Cov(x) = E[x x^T] - E[x] E[x]^T in float32,
where BatchNorm computes E[y^2] - E[y]^2 of the rounded y: the same kind of cancellation,
moved from y to x. y is rounded to the compute dtype as the convolution rounds it and
normalised in float32, as BatchNorm does; the input gradient's two matmuls round their
outputs to the compute dtype and add in float32. In bf16 the errors match conv +
BatchNorm's (tests/test_folded_batch_norm.py).
Under `shard_map` (`axis_name`), the sums and the Gram matrix are summed over the devices;
the weight gradient is this device's part, summed over the devices when the kernel is
replicated, as autodiff does for a convolution.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _contract_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T b for (N, P) and (N, Q) row arrays: (P, Q) in float32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _psum(value, axis_name: str | None):
  return value if axis_name is None else jax.lax.psum(value, axis_name)


def _varying_axes(x: jax.Array) -> frozenset:
  """The shard_map axes along which x varies (its type's; jax 0.10 names them
  `manual_axis_type.varying`, earlier versions `vma`)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _summed_like(grad: jax.Array, primal: jax.Array, axis_name: str | None) -> jax.Array:
  """`grad`, this device's part, summed over `axis_name` when `primal` is the same on
  every device (a replicated kernel inside shard_map), as autodiff would sum it."""
  if (axis_name is not None and axis_name in _varying_axes(grad)
      and axis_name not in _varying_axes(primal)):
    return jax.lax.psum(grad, axis_name)
  return grad


def _statistics(rows, kernel, epsilon, axis_name):
  """(mean, var, inv_std, row sums of x, Gram x^T x) with this device's sums and Gram."""
  weights = kernel.astype(_F32)
  row_sum = rows.astype(_F32).sum(axis=0)  # (Cin,)
  gram = _contract_rows(rows, rows)  # (Cin, Cin)
  total, total_gram = _psum((row_sum, gram), axis_name)
  count = _psum(rows.shape[0], axis_name)
  mean_x = total / count
  covariance = total_gram / count - jnp.outer(mean_x, mean_x)
  mean = mean_x @ weights  # (Cout,)
  var = jnp.maximum(0.0, jnp.sum(weights * (covariance @ weights), axis=0))
  inv_std = jax.lax.rsqrt(var + epsilon)
  return mean, var, inv_std, row_sum, gram


def _normalised(rows, kernel, scale, bias, mean, inv_std, out_dtype):
  gain = inv_std * scale.astype(_F32)
  shift = bias.astype(_F32) - mean * gain
  # y = x W rounded to the compute dtype as the convolution rounds it, then y * gain +
  # shift in float32: BatchNorm's own arithmetic. (Folding the gain into W before the
  # matmul rounded twice, W * gain and its product; ~2x BatchNorm's error in bf16 for
  # inputs with means 3x their spread.) XLA writes y either way: it fuses no epilogue into
  # its GEMMs, and the gain rides in the pass that adds the shift.
  return ((rows @ kernel).astype(_F32) * gain + shift).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def conv1x1_batch_norm(rows: jax.Array, kernel: jax.Array, scale: jax.Array,
                       bias: jax.Array, epsilon: float, axis_name: str | None,
                       out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm(rows @ kernel) in training mode: (z (N, Cout) in `out_dtype`, batch mean,
  batch variance), both float32 (Cout,). rows (N, Cin) and kernel (Cin, Cout) in the
  compute dtype; scale and bias (Cout,) as the BatchNorm applies them. The statistics
  are over the N rows (and the `axis_name` devices)."""
  mean, var, inv_std, _, _ = _statistics(rows, kernel, epsilon, axis_name)
  return _normalised(rows, kernel, scale, bias, mean, inv_std, out_dtype), mean, var


def _conv1x1_batch_norm_fwd(rows, kernel, scale, bias, epsilon, axis_name, out_dtype):
  mean, var, inv_std, row_sum, gram = _statistics(rows, kernel, epsilon, axis_name)
  z = _normalised(rows, kernel, scale, bias, mean, inv_std, out_dtype)
  return (z, mean, var), (rows, kernel, scale, mean, inv_std, row_sum, gram)


def _conv1x1_batch_norm_bwd(epsilon, axis_name, out_dtype, residuals, cotangents):
  del epsilon, out_dtype
  rows, kernel, scale, mean, inv_std, row_sum, gram = residuals
  grad, grad_mean, grad_var = cotangents
  weights = kernel.astype(_F32)
  grad_rows_weights = _contract_rows(rows, grad)  # x^T g: (Cin, Cout), this device's rows
  local_grad_sum = grad.astype(_F32).sum(axis=0)
  # sum(g * (y - mean)) = colsum(W * x^T g) - mean * sum(g).
  local_grad_centered_sum = (jnp.sum(weights * grad_rows_weights, axis=0)
                             - mean * local_grad_sum)
  grad_sum, grad_centered_sum = _psum((local_grad_sum, local_grad_centered_sum), axis_name)
  count = _psum(rows.shape[0], axis_name)
  # BatchNorm's closed-form gradient (layers.batch_norm_train):
  # dL/dy = gain * g + centered_coef * (y - mean) + offset.
  gain = scale.astype(_F32) * inv_std
  centered_coef = (-gain * inv_std * inv_std * grad_centered_sum + 2.0 * grad_var) / count
  offset = (-gain * grad_sum + grad_mean) / count
  y_coef = offset - centered_coef * mean  # dL/dy = gain * g + centered_coef * y + y_coef
  grad_kernel = (grad_rows_weights * gain + (gram @ weights) * centered_coef
                 + jnp.outer(row_sum, y_coef))
  compute = rows.dtype
  # Two matmuls with outputs in the compute dtype (XLA fuses no epilogue: float32 outputs
  # would be written and re-read at twice the bytes), summed in float32.
  grad_x = ((grad @ (weights * gain).T.astype(compute)).astype(_F32)
            + (rows @ ((weights * centered_coef) @ weights.T).astype(compute)).astype(_F32)
            + y_coef @ weights.T)
  return (grad_x.astype(rows.dtype),
          _summed_like(grad_kernel.astype(kernel.dtype), kernel, axis_name),
          (grad_centered_sum * inv_std).astype(scale.dtype), grad_sum.astype(scale.dtype))


conv1x1_batch_norm.defvjp(_conv1x1_batch_norm_fwd, _conv1x1_batch_norm_bwd)
