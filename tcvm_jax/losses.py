"""The multi-positive InfoNCE loss of Eq. (1)-(2) (supervised-contrastive form, [27]).

For anchor i with positives P(i) (the other clips of the same source video) and the
denominator over every other clip of the global batch A(i) = {k != i}:

  l_i = reduce_{j in P(i)} -log( exp(cos(z_i, z_j)/tau) / sum_{k in A(i)} exp(cos(z_i, z_k)/tau) )

`reduce` is the mean over positives by default (SupCon's L_out; the sum over positives sits
outside the log) or the plain sum as written in Eq. (1)-(2). The loss is the mean of l_i
over anchors that have at least one positive.

Under `jax.jit` with the clip axis sharded over devices, `embeddings` is the global array:
XLA gathers it for the similarity matrix and the gradients flow back to every shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POSITIVE_REDUCTIONS = ("mean", "sum")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def multi_positive_infonce(
    embeddings: jax.Array,
    labels: jax.Array,
    temperature: float = 0.07,
    positive_reduction: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss and diagnostics for embeddings (N, D) whose equal `labels` (N,) are positives."""
  if positive_reduction not in POSITIVE_REDUCTIONS:
    raise ValueError(f"loss.positive_reduction={positive_reduction!r}; "
                     f"choose from {POSITIVE_REDUCTIONS}.")
  if temperature <= 0:
    raise ValueError(f"loss.temperature={temperature} must be > 0.")
  z = l2_normalize(embeddings.astype(jnp.float32))
  cosine = z @ z.T  # (N, N)
  num = cosine.shape[0]
  not_self = ~jnp.eye(num, dtype=bool)
  positive = (labels[:, None] == labels[None, :]) & not_self
  logits = cosine / temperature
  log_denominator = jax.nn.logsumexp(jnp.where(not_self, logits, -jnp.inf), axis=1)
  log_prob = logits - log_denominator[:, None]  # (N, N)
  num_positives = positive.sum(axis=1)
  per_anchor = -jnp.where(positive, log_prob, 0.0).sum(axis=1)
  if positive_reduction == "mean":
    per_anchor = per_anchor / jnp.maximum(num_positives, 1)
  has_positive = num_positives > 0
  loss = jnp.where(has_positive, per_anchor, 0.0).sum() / jnp.maximum(has_positive.sum(), 1)

  negative = ~positive & not_self
  metrics = {
      "positive_similarity": (jnp.where(positive, cosine, 0.0).sum()
                              / jnp.maximum(positive.sum(), 1)),
      "negative_similarity": (jnp.where(negative, cosine, 0.0).sum()
                              / jnp.maximum(negative.sum(), 1)),
  }
  return loss, metrics
