"""Schedules and the SGD update against hand-computed PyTorch-style references."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from tcvm_jax import optim


def test_step_schedule_scales_with_batch_and_decays_at_epochs():
  config = pretrain.get_config()
  config.batch_size = 64
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=10, num_train_steps=2000)
  peak = 0.1 * 64 / 32
  for step, expected in [(0, peak), (499, peak), (500, peak * 0.1), (999, peak * 0.1),
                         (1000, peak * 0.01), (1500, peak * 0.001), (1999, peak * 0.001)]:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_cosine_schedule_with_warmup():
  config = pretrain.get_config()
  config.schedule = "cosine"
  config.warmup_epochs = 2
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=5, num_train_steps=110)
  np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)  # half-way up the warm-up
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 0.05, rtol=1e-5)  # half-way down the cosine
  assert float(schedule(110)) < 1e-8


def test_sgd_matches_pytorch_update_rule():
  config = pretrain.get_config()
  optimizer, _ = optim.create_optimizer(config, steps_per_epoch=100, num_train_steps=1000)
  param = jnp.asarray([1.0, -2.0])
  state = optimizer.init(param)
  buffer = np.zeros(2)
  expected = np.asarray(param)
  for grad in ([0.5, 0.25], [-1.0, 2.0], [0.1, 0.1]):
    # torch.optim.SGD: g += wd * p; buf = m * buf + g; p -= lr * buf
    g = np.asarray(grad) + 1e-4 * expected
    buffer = 0.9 * buffer + g
    expected = expected - 0.1 * buffer
    updates, state = optimizer.update(jnp.asarray(grad), state, param)
    param = param + updates
  np.testing.assert_allclose(np.asarray(param), expected, rtol=1e-6)


def test_unknown_schedule_names_the_field():
  config = pretrain.get_config()
  config.schedule = "linear"
  with pytest.raises(ValueError, match="config.schedule"):
    optim.create_learning_rate_schedule(config, 10, 100)
