"""The optimizer and learning-rate schedules (Sec. 4.1, Table 3e).

SGD with momentum 0.9 and weight decay 1e-4 added to the gradient before momentum, as
PyTorch's `torch.optim.SGD(weight_decay=...)` does. The learning rate is
`base_learning_rate * batch_size / 32` (linear scaling from the paper's 8 GPUs x 4 videos).
The pretraining step runs the optimizer on the params raveled into one vector
(`flat_state.FlatForm`, config.state_layout 'flat'): every transform here must act
elementwise (no per-array statistics such as LARS) for that to equal the per-array update.
"""

from __future__ import annotations

import ml_collections
import optax

REFERENCE_BATCH_SIZE = 32
SCHEDULES = ("step", "cosine")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  return config.base_learning_rate * config.batch_size / REFERENCE_BATCH_SIZE


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                                  num_train_steps: int) -> optax.Schedule:
  """'step': x`decay_factor` at each of `decay_epochs`; 'cosine': cosine to zero.

  Both start with `warmup_epochs` of linear warm-up from zero when it is positive.
  """
  if config.schedule not in SCHEDULES:
    raise ValueError(f"config.schedule={config.schedule!r}; choose from {SCHEDULES}.")
  peak = peak_learning_rate(config)
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "step":
    boundaries = {int(epoch * steps_per_epoch) - warmup_steps: config.decay_factor
                  for epoch in config.decay_epochs if epoch * steps_per_epoch > warmup_steps}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    main = optax.cosine_decay_schedule(peak, max(num_train_steps - warmup_steps, 1))
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = create_learning_rate_schedule(config, steps_per_epoch, num_train_steps)
  optimizer = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum),
  )
  return optimizer, schedule
