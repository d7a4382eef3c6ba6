"""The one module that talks to orbax: training checkpoints and the exported encoder.

Training checkpoints (`WORKDIR/checkpoints/<step>/`) hold two items:
  state  the train state (step, params, batch_stats, opt_state, rng) as a nested dict of
         arrays keyed by tree path, so the files do not depend on flax/optax classes;
         the PRNG key is stored as its raw uint32 key data.
  data   JSON: the position in the input stream (`batches_consumed`) and the run's seed.
Saves are asynchronous; orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a process killed mid-save leaves a temporary directory that is never
loaded (and is removed when the next run opens the directory).

The encoder export (`WORKDIR/encoder/`) is what fine-tuning and retrieval load by path:
  state/        backbone params + batch statistics (orbax, nested dicts).
  config.json   the full pretraining config (backbone name, dtype, frames, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

CHECKPOINTS_DIRNAME = "checkpoints"
ENCODER_DIRNAME = "encoder"
ENCODER_CONFIG_FILENAME = "config.json"
ENCODER_STATE_DIRNAME = "state"
_STATE_ITEM = "state"
_DATA_ITEM = "data"
_KEY_DATA_SUFFIX = "__prng_key_data"


# --- Pytrees <-> nested dicts of arrays ----------------------------------------------


def _path_names(path: tuple) -> tuple[str, ...]:
  """Tree path -> names; the trailing `.value` of an nnx Variable is dropped."""
  names = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      names.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(entry.name)
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      names.append(str(entry.key))
    else:
      names.append(str(entry))
  if len(names) > 1 and names[-1] == "value":
    names.pop()
  return tuple(names)


def _is_prng_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                jax.dtypes.prng_key)


def flatten_by_path(tree: Any) -> dict[tuple[str, ...], Any]:
  """{('params', 'backbone', 'stem_conv', 'kernel'): leaf, ...}; keys become raw key data."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = _path_names(path)
    if _is_prng_key(leaf):
      names = names[:-1] + (names[-1] + _KEY_DATA_SUFFIX,)
      leaf = jax.random.key_data(leaf)
    if names in flat:
      raise ValueError(f"Two leaves share the checkpoint path {'/'.join(names)}.")
    flat[names] = leaf
  return flat


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  nested: dict[str, Any] = {}
  for names, leaf in flat.items():
    node = nested
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf
  return nested


def unnest(nested: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for name, value in nested.items():
    if isinstance(value, Mapping):
      flat.update(unnest(value, prefix + (str(name),)))
    else:
      flat[prefix + (str(name),)] = value
  return flat


def fill_like(template: Any, flat_values: Mapping[tuple[str, ...], Any]) -> Any:
  """`template` with each leaf replaced by `flat_values[its path]` (the inverse of flatten)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, template_leaf in leaves_with_path:
    names = _path_names(path)
    if _is_prng_key(template_leaf):
      names = names[:-1] + (names[-1] + _KEY_DATA_SUFFIX,)
      value = jax.random.wrap_key_data(flat_values[names],
                                       impl=jax.random.key_impl(template_leaf))
    else:
      if names not in flat_values:
        raise KeyError(f"Checkpoint has no entry for {'/'.join(names)}.")
      value = flat_values[names]
    if tuple(value.shape) != tuple(template_leaf.shape):
      raise ValueError(f"Checkpoint entry {'/'.join(names)} has shape {tuple(value.shape)}, "
                       f"the model expects {tuple(template_leaf.shape)}: was it written "
                       f"with another config?")
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract(flat: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
  """ShapeDtypeStructs that keep each array's sharding, so restores land where they belong."""
  return {names: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
          for names, x in flat.items()}


# --- Training checkpoints ------------------------------------------------------------


class Checkpointer:
  """Periodic asynchronous checkpoints of the train state and the data position."""

  def __init__(self, directory: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        # We decide when to save (`should_save`, preemption, the last step); orbax's
        # default policy would also save the first step of every run.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        create=True,
        # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`; never loaded, and
        # removed here so it cannot accumulate.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE_ITEM: ocp.StandardCheckpointHandler(),
                       _DATA_ITEM: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """A periodic save is due: every `every_steps` steps."""
    return step > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_position: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving (returns once the arrays are copied to host when async).

    `force` saves off the periodic schedule (preemption, the last step). Returns whether
    a save was started (False when this step is already saved).
    """
    if (not force and not self.should_save(step)) or step in self._manager.all_steps():
      return False
    state_tree = nest(flatten_by_path(state))
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(state_tree),
            _DATA_ITEM: ocp.args.JsonSave(dict(data_position)),
        }),
        force=True)  # the decision is ours (above), not orbax's policy

  def restore(self, like_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores `step` (default: the latest) into the structure and shardings of `like_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
    # `like_state` is a concrete state (e.g. freshly initialised): its shapes, dtypes and
    # shardings say where each restored array goes.
    flat_target = _abstract(flatten_by_path(like_state))
    self._check_compatible(step, flat_target)
    target = nest(flat_target)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(target),
            _DATA_ITEM: ocp.args.JsonRestore(),
        }))
    state = fill_like(like_state, unnest(restored[_STATE_ITEM]))
    return state, dict(restored[_DATA_ITEM])

  def _check_compatible(self, step: int, flat_target: Mapping[tuple[str, ...], Any]) -> None:
    """Fails with the offending entry when the checkpoint was written for another model."""
    stored = unnest(dict(self._manager.item_metadata(step)[_STATE_ITEM]))
    missing = sorted("/".join(k) for k in flat_target.keys() - stored.keys())
    unexpected = sorted("/".join(k) for k in stored.keys() - flat_target.keys())
    if missing or unexpected:
      raise ValueError(
          f"Checkpoint {self.directory}/{step} does not fit this model: missing "
          f"{missing[:5]}, unexpected {unexpected[:5]}. Was it written with another config "
          f"(model.backbone, ...)? Use a fresh --workdir for a different model.")
    for names, target in flat_target.items():
      if tuple(stored[names].shape) != tuple(target.shape):
        raise ValueError(
            f"Checkpoint entry {'/'.join(names)} in {self.directory}/{step} has shape "
            f"{tuple(stored[names].shape)}; this model expects {tuple(target.shape)}. Was it "
            f"written with another config? Use a fresh --workdir for a different model.")

  def read(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested dict of host NumPy arrays, data position) of a checkpoint, without a model.

    For inspection and tests: works on any machine, whatever devices wrote it.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
    metadata = self._manager.item_metadata(step)[_STATE_ITEM]
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(metadata))
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(target),
            _DATA_ITEM: ocp.args.JsonRestore(),
        }))
    return restored[_STATE_ITEM], dict(restored[_DATA_ITEM])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are finalised on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def checkpoints_directory(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIRNAME)


# --- Encoder export for fine-tuning / retrieval ----------------------------------------


@dataclasses.dataclass
class EncoderCheckpoint:
  """An exported backbone: `params` / `batch_stats` are nested dicts keyed like the module."""

  config: ml_collections.ConfigDict
  params: dict[str, Any]
  batch_stats: dict[str, Any]


def _backbone_state(state: Any) -> Any:
  """The `backbone` sub-tree of a TCVM model's params or batch stats (dict or nnx.State)."""
  return state["backbone"]


def save_encoder(directory: str, params: Any, batch_stats: Any,
                 config: ml_collections.ConfigDict) -> str:
  """Writes the backbone of a TCVM train state to `directory` (replacing an older export).

  `params` / `batch_stats`: the TCVM model's, nested dicts or nnx.States; only `backbone`
  is kept.
  Every process must call this (orbax coordinates the write).
  """
  directory = os.path.abspath(directory)
  tree = {"params": nest(flatten_by_path(_backbone_state(params))),
          "batch_stats": nest(flatten_by_path(_backbone_state(batch_stats)))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, ENCODER_STATE_DIRNAME), tree, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    with open(os.path.join(directory, ENCODER_CONFIG_FILENAME), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("Exported the encoder to %s", directory)
  return directory


def load_encoder(path: str) -> EncoderCheckpoint:
  """Reads an encoder export (a `WORKDIR/encoder` directory, or the WORKDIR itself).

  Arrays come back as host NumPy arrays, to be placed or sharded by the caller.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, ENCODER_DIRNAME)):
    path = os.path.join(path, ENCODER_DIRNAME)
  config_path = os.path.join(path, ENCODER_CONFIG_FILENAME)
  state_path = os.path.join(path, ENCODER_STATE_DIRNAME)
  if not (os.path.isfile(config_path) and os.path.isdir(state_path)):
    raise FileNotFoundError(
        f"No encoder export at {path}: expected {ENCODER_CONFIG_FILENAME} and "
        f"{ENCODER_STATE_DIRNAME}/ (written by pretraining into WORKDIR/{ENCODER_DIRNAME}).")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(state_path).item_metadata
  # Restore to host memory whatever devices the export was written on.
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(metadata))
  tree = checkpointer.restore(state_path, target)
  checkpointer.close()
  return EncoderCheckpoint(config=config, params=tree["params"],
                           batch_stats=tree["batch_stats"])


def load_encoder_into(backbone: nnx.Module, encoder: EncoderCheckpoint | str) -> nnx.Module:
  """Copies an exported encoder's weights into `backbone` (built with the same architecture)."""
  if isinstance(encoder, str):
    encoder = load_encoder(encoder)
  _, params, batch_stats = nnx.split(backbone, nnx.Param, nnx.BatchStat)
  params = fill_like(params, unnest(encoder.params))
  batch_stats = fill_like(batch_stats, unnest(encoder.batch_stats))
  nnx.update(backbone, params, batch_stats)
  return backbone
