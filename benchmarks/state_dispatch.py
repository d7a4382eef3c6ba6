r"""Host time of one jitted call on the pretraining state: nnx.States, plain dicts, flat.

  python benchmarks/state_dispatch.py [--config=configs/pretrain.py[:preset]] \
      [--calls=200] [--rounds=6]

The train state (params, BatchNorm statistics, SGD momentum, step, key) is the step's
argument and result: every jitted call flattens it, and unflattens the result. As
nnx.States each parameter is an nnx Variable, flattened through Python; as plain dicts
(what `tcvm_jax/train_step.py` keeps since 2026-11-27) the flattening stays in C++.
Both layouts are built from the config's model with every leaf cut to one element, so
the device work is nil and what is timed is the host's part of a call: the same count
of leaves and the same tree shape as the real step. The call adds one to each leaf, with
the state donated, as the step does. 'flat' is the dicts with params, statistics and
momentum as one vector per dtype each (`tcvm_jax/flat_state.FlatForm`,
config.state_layout 'flat': what the training loop carries). Rounds
alternate the layouts' order. Prints the median per-call time of each layout and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from benchmarks import ab_rounds  # pylint: disable=g-import-not-at-top
from tcvm_jax import config_files, flat_state, optim  # pylint: disable=g-import-not-at-top
from tcvm_jax import model as model_lib  # pylint: disable=g-import-not-at-top


def tiny_states(config) -> dict[str, dict]:
  """{'nnx.State': state, 'dict': state}: the step's state layouts, one element a leaf."""
  model = nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  optimizer, _ = optim.create_optimizer(config, steps_per_epoch=1, num_train_steps=1)

  def state(params, batch_stats):
    params = jax.tree.map(lambda x: jnp.zeros((1,), x.dtype), params)
    batch_stats = jax.tree.map(lambda x: jnp.zeros((1,), x.dtype), batch_stats)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
            "opt_state": optimizer.init(params), "rng": jax.random.key(0)}

  return {"nnx.State": state(params, batch_stats),
          "dict": state(nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))}


def add_one(state):
  return jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else x + 1, state)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py",
                      help="configs/pretrain.py[:preset].")
  parser.add_argument("--calls", type=int, default=200, help="Calls per round.")
  parser.add_argument("--rounds", type=int, default=6, help="Alternating rounds.")
  args = parser.parse_args(argv)
  config = config_files.load_config(args.config)
  states = tiny_states(config)
  form = flat_state.FlatForm.of(states["dict"])
  states["flat"] = form.to_carried(tiny_states(config)["dict"])  # its own arrays (donated)
  steps = {name: jax.jit(add_one, donate_argnums=0) for name in states}
  per_round: dict[str, list[float]] = {name: [] for name in states}
  for name in states:
    states[name] = jax.block_until_ready(steps[name](states[name]))  # compile
  for round_index in range(args.rounds):
    for name in ab_rounds.round_order(list(states), round_index):
      state = states[name]
      start = time.perf_counter()
      for _ in range(args.calls):
        state = steps[name](state)
      states[name] = jax.block_until_ready(state)
      per_round[name].append((time.perf_counter() - start) / args.calls)
  leaves = {name: len(jax.tree.leaves(state)) for name, state in states.items()}
  times = {name: statistics.median(values) for name, values in per_round.items()}
  for name, seconds in times.items():
    print(f"{name:<10} {seconds * 1e3:7.3f} ms per call  (rounds: "
          f"{', '.join(f'{value * 1e3:.2f}' for value in per_round[name])})")
  print(f"{config.model.backbone}: {leaves['dict']} leaves in the state, {leaves['flat']} "
        f"flat; nnx.State / dict = {times['nnx.State'] / times['dict']:.2f}x, dict / flat "
        f"= {times['dict'] / times['flat']:.2f}x, on {jax.devices()[0].device_kind}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
