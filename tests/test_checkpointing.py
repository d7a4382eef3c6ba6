"""Checkpoints: exact round trips, the schedule, half-written saves, and real faults.

The fault test trains a tiny model in child processes: an uninterrupted reference run,
then a run SIGKILLed between checkpoints and a resumed run stopped by SIGTERM
(preemption). Every replayed step's loss and the preemption checkpoint must equal the
reference run's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tcvm_jax import checkpointing
from train_test_utils import assert_states_close, run_helper


class _Tiny(nnx.Module):
  """A backbone/head split like TCVM's, with params, batch stats and a list."""

  def __init__(self, rngs: nnx.Rngs):
    self.backbone = nnx.Sequential(nnx.Linear(3, 5, rngs=rngs), nnx.BatchNorm(5, rngs=rngs))
    self.head = nnx.Linear(5, 2, rngs=rngs)


def _train_state(seed: int, step: int = 0) -> dict:
  """A train state with every kind of leaf the trainer saves (typed key included)."""
  model = _Tiny(nnx.Rngs(seed))
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  opt_state = optimizer.init(params)
  # Non-zero momentum, so the optimizer state is actually compared.
  opt_state = jax.tree.map(lambda x: x + seed + 0.5, opt_state)
  batch_stats = jax.tree.map(lambda x: x + seed, batch_stats)
  return {"step": jnp.asarray(step, jnp.int32), "params": params,
          "batch_stats": batch_stats, "opt_state": opt_state,
          "rng": jax.random.key(100 + seed)}


def _leaves(state) -> list[np.ndarray]:
  return [np.asarray(jax.random.key_data(x) if checkpointing._is_prng_key(x) else x)
          for x in jax.tree.leaves(state)]


def test_state_round_trip_is_exact(tmp_path):
  saved = _train_state(seed=1, step=6)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=3)
  assert checkpointer.save(6, saved, {"batches_consumed": 6, "global_batch_size": 8})
  checkpointer.wait()
  like = _train_state(seed=7)  # different values, same structure
  restored, position = checkpointer.restore(like)
  checkpointer.close()

  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  saved_leaves, restored_leaves = _leaves(saved), _leaves(restored)
  assert len(saved_leaves) == len(restored_leaves) == len(_leaves(like))
  for expected, actual in zip(saved_leaves, restored_leaves):
    np.testing.assert_array_equal(actual, expected)
  assert position == {"batches_consumed": 6, "global_batch_size": 8}
  # The key comes back as a usable typed key that draws the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(saved["rng"], (3,)))
  assert isinstance(restored["params"], nnx.State)


def test_a_checkpoint_of_nnx_states_restores_into_plain_dicts(tmp_path):
  # The trainers' states held nnx.States until 2026-11-27 and hold plain dicts since
  # (tcvm_jax/train_step.py): both write the same paths, so older checkpoints still load.
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  saved = _train_state(seed=3)
  assert checkpointer.save(1, saved, {"batches_consumed": 1})
  checkpointer.wait()
  like = _train_state(seed=7)
  like = jax.tree.map(lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
                      like, is_leaf=lambda x: isinstance(x, nnx.State))
  assert jax.tree.structure(like) != jax.tree.structure(saved)
  restored, _ = checkpointer.restore(like)
  checkpointer.close()
  assert type(restored["params"]) is dict and type(restored["batch_stats"]) is dict
  assert jax.tree.structure(restored) == jax.tree.structure(like)
  for expected, actual in zip(_leaves(saved), _leaves(restored)):
    np.testing.assert_array_equal(actual, expected)


def test_schedule_keeps_latest_k_and_force_saves(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=2)
  state = _train_state(seed=0)
  started = [step for step in range(1, 8) if checkpointer.save(step, state, {"step": step})]
  assert started == [2, 4, 6]
  assert checkpointer.save(7, state, {"step": 7}, force=True)  # e.g. the last step
  assert not checkpointer.save(7, state, {"step": 7}, force=True)  # never twice
  checkpointer.wait()
  assert checkpointer.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]
  checkpointer.close()


def test_half_written_checkpoint_is_never_loaded(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=5)
  good = _train_state(seed=3, step=2)
  checkpointer.save(2, good, {"batches_consumed": 2})
  checkpointer.close()
  # What a process killed in the middle of saving step 4 leaves behind.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1795660000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 100)

  reopened = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=5)
  assert reopened.latest_step() == 2
  restored, position = reopened.restore(_train_state(seed=9))
  assert position == {"batches_consumed": 2}
  for expected, actual in zip(_leaves(good), _leaves(restored)):
    np.testing.assert_array_equal(actual, expected)
  assert not partial.exists()  # cleaned up when the directory is opened
  reopened.close()


def test_restore_names_mismatched_entry(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  checkpointer.save(1, {"params": {"kernel": jnp.zeros((3, 4))}}, {})
  checkpointer.wait()
  with pytest.raises(ValueError, match="params/kernel"):
    checkpointer.restore({"params": {"kernel": jnp.zeros((5, 4))}})
  checkpointer.close()


def test_encoder_export_round_trip(tmp_path):
  state = _train_state(seed=2)
  config = ml_collections.ConfigDict({"model": {"backbone": "r3d_tiny"}, "seed": 2})
  checkpointing.save_encoder(str(tmp_path / "encoder"), state["params"],
                             state["batch_stats"], config)
  encoder = checkpointing.load_encoder(str(tmp_path))  # the workdir works too
  assert encoder.config.model.backbone == "r3d_tiny"
  assert set(encoder.params) == {"layers"}  # the backbone only, no head
  target = _Tiny(nnx.Rngs(5)).backbone
  checkpointing.load_encoder_into(target, encoder)
  _, params, batch_stats = nnx.split(target, nnx.Param, nnx.BatchStat)
  for name, expected, actual in [("params", state["params"]["backbone"], params),
                                 ("batch_stats", state["batch_stats"]["backbone"],
                                  batch_stats)]:
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
  with pytest.raises(FileNotFoundError, match="No encoder export"):
    checkpointing.load_encoder(str(tmp_path / "nowhere"))


def _history_losses(results: dict) -> dict[int, float]:
  return {entry["step"]: entry["loss"] for entry in results["history"]}


def _read_params(workdir, step: int) -> dict:
  checkpointer = checkpointing.Checkpointer(checkpointing.checkpoints_directory(str(workdir)),
                                            every_steps=2, keep=10)
  tree, position = checkpointer.read(step)
  checkpointer.close()
  return tree, position


def test_sigkill_and_sigterm_resume_like_an_uninterrupted_run(tmp_path):
  overrides = {"num_train_steps": 6, "checkpoint_every_steps": 2, "log_every_steps": 1}
  reference_dir, faulty_dir = tmp_path / "reference", tmp_path / "faulty"

  # The reference saves every step, so any step of the faulty runs can be compared.
  code, reference, stderr = run_helper({
      "workdir": str(reference_dir), "overrides": {**overrides, "checkpoint_every_steps": 1}})
  assert code == 0, stderr[-3000:]
  reference_losses = _history_losses(reference)
  assert sorted(reference_losses) == [1, 2, 3, 4, 5, 6]

  # Run 1: SIGKILL when asking for batch 4 (0-based), i.e. after step 4 was dispatched
  # and possibly while step 4's asynchronous save is still being written.
  code, result, stderr = run_helper({"workdir": str(faulty_dir), "overrides": overrides,
                                     "sigkill_before_batch": 4})
  assert code == -9 and result is None, stderr[-3000:]
  finished = sorted(int(name) for name in os.listdir(faulty_dir / "checkpoints")
                    if name.isdigit())
  assert finished and set(finished) <= {2, 4}
  killed_at = max(finished)

  # Run 2: resumes from the newest finished checkpoint. SIGTERM (preemption) when asking
  # for batch 4: step 5 still runs, then a checkpoint is saved at step 5, off the
  # every-2-steps schedule, and the run returns cleanly.
  code, resumed, stderr = run_helper({"workdir": str(faulty_dir), "overrides": overrides,
                                      "sigterm_before_batch": 4})
  assert code == 0, stderr[-3000:]
  assert resumed["resumed_from_step"] == killed_at
  assert resumed["preempted"] and resumed["step"] == 5
  assert not (faulty_dir / "results.json").exists()  # not finished

  # Same data, same keys, same updates: every replayed step's loss equals the reference's.
  replayed = _history_losses(resumed)
  assert sorted(replayed) == list(range(killed_at + 1, 6))
  for step, loss in replayed.items():
    np.testing.assert_allclose(loss, reference_losses[step], rtol=1e-5, err_msg=f"step {step}")
  # And the whole saved state (params, BN stats, momentum, rng, step) matches at step 5.
  reference_state, reference_position = _read_params(reference_dir, 5)
  preempted_state, preempted_position = _read_params(faulty_dir, 5)
  assert preempted_position["batches_consumed"] == reference_position["batches_consumed"] == 5
  assert_states_close(checkpointing.unnest(preempted_state),
                      checkpointing.unnest(reference_state))
