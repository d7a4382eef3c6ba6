"""The train state's flat form (tcvm_jax/flat_state.py): exact round trip, few leaves, and
the same step as the tree, the optimizer run on the vectors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import pretrain  # noqa: E402
from tcvm_jax import config_validation  # noqa: E402
from tcvm_jax import flat_state, mesh as mesh_lib, optim, train, train_step  # noqa: E402
from tests.train_test_utils import tiny_config  # noqa: E402


def _tree_leaves(state):
  return jax.tree_util.tree_flatten_with_path(state)[0]


def _assert_trees_equal(actual, expected):
  actual_leaves, expected_leaves = _tree_leaves(actual), _tree_leaves(expected)
  assert [path for path, _ in actual_leaves] == [path for path, _ in expected_leaves]
  for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
    if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def test_round_trip_is_exact_and_buffers_hold_every_element():
  rng = np.random.default_rng(0)
  state = {
      "step": jnp.int32(7),
      "params": {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
                 "b": jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32)},
      "counts": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
      "half": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
      "rng": jax.random.key(3),
  }
  layout = flat_state.FlatLayout.of(state)
  flat = layout.flatten(state)
  # One buffer per dtype of the arrays; scalars and keys kept, named by their path.
  assert set(flat) == {"float32", "int32", "bfloat16", "step", "rng"}
  assert flat["float32"].shape == (3 * 4 + 4 + 2 * 2 * 5,)
  assert flat["int32"].shape == (6,) and flat["bfloat16"].shape == (5,)
  # The float32 buffer is its arrays' values, raveled, in the tree's leaf order.
  expected = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state)
                             if x.dtype == jnp.float32 and x.ndim])
  np.testing.assert_array_equal(flat["float32"], expected)
  _assert_trees_equal(layout.unflatten(flat), state)
  _assert_trees_equal(jax.jit(layout.unflatten)(jax.jit(layout.flatten)(state)), state)


def test_layout_rejects_a_flat_state_missing_a_buffer_and_a_wrong_tree():
  state = {"step": jnp.int32(0), "w": jnp.ones((2, 3)), "v": jnp.ones((4,), jnp.int32)}
  layout = flat_state.FlatLayout.of(state)
  flat = layout.flatten(state)
  del flat["int32"]
  with pytest.raises(KeyError, match="int32"):
    layout.unflatten(flat)
  with pytest.raises(ValueError):
    layout.flatten({"step": jnp.int32(0), "w": jnp.ones((2, 3))})


def _tiny_state_and_step(num_train_steps=2):
  config = tiny_config()
  mesh = mesh_lib.create_mesh()
  steps_per_epoch, _ = train.num_train_steps_for(config, train.RANDOM_NUM_VIDEOS)
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch, num_train_steps)
  graphdef, state = train_step.create_train_state(config, mesh, optimizer)
  return config, mesh, optimizer, schedule, graphdef, state


def test_flat_form_round_trip_is_exact_and_vectors_follow_the_params_layout():
  _, mesh, _, _, _, state = _tiny_state_and_step()
  form = flat_state.FlatForm.of(state)
  replicated = mesh_lib.replicated_sharding(mesh)
  carried = form.jit_to_carried(replicated)(state)
  params = jax.tree.leaves(state["params"])
  assert len(params) > 50  # R3D-tiny's arrays...
  # ...travel as one vector each for params, statistics and momentum, plus 3 scalars/keys.
  assert len(jax.tree.leaves(carried)) == 6
  expected = np.concatenate([np.ravel(x) for x in params])
  np.testing.assert_array_equal(carried["params"]["float32"], expected)
  momentum = carried["opt_state"][1][0].trace["float32"]
  assert momentum.shape == expected.shape  # the momentum in the params' layout
  np.testing.assert_array_equal(
      momentum, np.concatenate([np.ravel(x) for x in jax.tree.leaves(
          state["opt_state"][1][0].trace)]))
  _assert_trees_equal(form.jit_to_tree(replicated)(carried), state)


def test_flat_step_matches_the_tree_step():
  """Three steps of the pretraining step from one initial state, carried flat (the
  optimizer on vectors) and as a tree: the same loss, norms, momentum and params (XLA may
  fuse the two programs differently, hence the tolerance; in practice they agree to float
  rounding). Three steps so that momentum and weight decay both act on a nonzero state."""
  config, mesh, optimizer, schedule, graphdef, state = _tiny_state_and_step(3)
  form = flat_state.FlatForm.of(state)
  replicated = mesh_lib.replicated_sharding(mesh)
  tree_fn = train_step.jit_train_step(
      train_step.make_train_step(config, graphdef, mesh, optimizer, schedule), mesh,
      donate=False)
  flat_fn = train_step.jit_train_step(
      train_step.make_train_step(config, graphdef, mesh, optimizer, schedule, form), mesh,
      donate=False)
  carried = form.jit_to_carried(replicated)(state)
  batches = train.random_video_batches(config, process_index=0,
                                       batch_size_per_process=config.batch_size)
  tree_state = state
  for _ in range(3):
    videos = mesh_lib.host_batch_to_global(next(batches)["video"], mesh)
    tree_state, tree_metrics = tree_fn(tree_state, videos)
    carried, flat_metrics = flat_fn(carried, videos)
    for name in ("loss", "grad_norm", "param_norm", "learning_rate"):
      np.testing.assert_allclose(flat_metrics[name], tree_metrics[name], rtol=1e-5)
  from_flat = form.jit_to_tree(replicated)(carried)
  assert int(from_flat["step"]) == 3
  assert jax.tree.structure(from_flat) == jax.tree.structure(tree_state)
  for part in ("params", "opt_state", "batch_stats"):
    for (path, a), (_, b) in zip(_tree_leaves(from_flat[part]),
                                 _tree_leaves(tree_state[part])):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7,
                                 err_msg=part + jax.tree_util.keystr(path))
  # The params did move: the comparison above is not between two initial states.
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(from_flat["params"]),
                                                       jax.tree.leaves(state["params"]))]
  assert max(moved) > 1e-4


def test_flat_step_drops_the_per_array_optimizer_work():
  """Compiled, the flat step has no per-array norms: the tree step reduces each of the
  params and gradient arrays on its own (2 x ~60 for R3D-tiny), the flat one each vector
  once; and with them go the per-array updates (fewer fusions)."""
  config, mesh, optimizer, schedule, graphdef, state = _tiny_state_and_step()
  replicated = mesh_lib.replicated_sharding(mesh)
  videos = mesh_lib.host_batch_to_global(next(train.random_video_batches(
      config, process_index=0, batch_size_per_process=config.batch_size))["video"], mesh)
  counts = {}
  for form in (flat_state.TreeForm(), flat_state.FlatForm.of(state)):
    step = train_step.jit_train_step(
        train_step.make_train_step(config, graphdef, mesh, optimizer, schedule, form), mesh,
        donate=False)
    hlo = step.lower(form.jit_to_carried(replicated)(state), videos).compile().as_text()
    counts[type(form).__name__] = {op: hlo.count(f" {op}(") for op in ("reduce", "fusion")}
  num_params = len(jax.tree.leaves(state["params"]))
  tree, flat = counts["TreeForm"], counts["FlatForm"]
  assert tree["reduce"] - flat["reduce"] >= 1.5 * num_params, counts
  assert tree["fusion"] - flat["fusion"] >= num_params, counts


def test_state_layout_is_validated():
  config = pretrain.get_config("demo")
  config.state_layout = "buffers"
  with pytest.raises(config_validation.ConfigError, match=r"config\.state_layout"):
    config_validation.validate_config(config, num_devices=1, check_paths=False,
                                      check_model=False)
