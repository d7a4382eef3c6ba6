"""The loss against a brute-force NumPy implementation of Eq. (1)-(2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcvm_jax import losses


def numpy_multi_positive_infonce(embeddings, labels, temperature, reduction):
  """Loops over anchors and positives exactly as Eq. (1) reads."""
  z = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  n = len(z)
  anchor_losses = []
  for i in range(n):
    denominator = sum(np.exp(z[i] @ z[k] / temperature) for k in range(n) if k != i)
    terms = [-np.log(np.exp(z[i] @ z[j] / temperature) / denominator)
             for j in range(n) if j != i and labels[j] == labels[i]]
    if not terms:
      continue
    anchor_losses.append(np.mean(terms) if reduction == "mean" else np.sum(terms))
  return np.mean(anchor_losses)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_brute_force(reduction, seed):
  rng = np.random.default_rng(seed)
  num_videos, num_clips, dim = 6, 4, 16
  embeddings = rng.normal(size=(num_videos * num_clips, dim)) * rng.uniform(0.5, 3)
  labels = rng.permutation(np.repeat(np.arange(num_videos), num_clips))
  expected = numpy_multi_positive_infonce(embeddings, labels, 0.07, reduction)
  loss, _ = losses.multi_positive_infonce(
      jnp.asarray(embeddings, jnp.float32), jnp.asarray(labels), 0.07, reduction)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_anchors_without_positives_are_left_out():
  rng = np.random.default_rng(3)
  embeddings = rng.normal(size=(7, 8))
  labels = np.array([0, 0, 1, 1, 1, 2, 3])  # labels 2 and 3 have no positive
  expected = numpy_multi_positive_infonce(embeddings, labels, 0.5, "mean")
  loss, _ = losses.multi_positive_infonce(jnp.asarray(embeddings), jnp.asarray(labels), 0.5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_gradient_matches_finite_differences_and_is_finite():
  rng = np.random.default_rng(4)
  embeddings = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
  fn = lambda e: losses.multi_positive_infonce(e, labels, 0.2)[0]
  grad = jax.grad(fn)(embeddings)
  assert np.all(np.isfinite(grad))
  direction = jnp.asarray(rng.normal(size=embeddings.shape), jnp.float32)
  eps = 1e-3
  numeric = (fn(embeddings + eps * direction) - fn(embeddings - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=2e-2)


def test_similarity_diagnostics():
  embeddings = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  labels = jnp.asarray([0, 0, 1, 1])
  _, metrics = losses.multi_positive_infonce(embeddings, labels)
  np.testing.assert_allclose(metrics["positive_similarity"], 1.0, atol=1e-6)
  np.testing.assert_allclose(metrics["negative_similarity"], 0.0, atol=1e-6)


def test_bad_settings_fail_with_the_field_name():
  with pytest.raises(ValueError, match="loss.positive_reduction"):
    losses.multi_positive_infonce(jnp.ones((2, 2)), jnp.zeros(2, int), 0.1, "max")
  with pytest.raises(ValueError, match="loss.temperature"):
    losses.multi_positive_infonce(jnp.ones((2, 2)), jnp.zeros(2, int), 0.0)
