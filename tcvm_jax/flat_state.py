"""The train state carried flat at the jitted step's boundary, and updated flat (#6).

Each jitted call flattens its arguments and builds its results leaf by leaf on the host.
R3D50's train state has 447 leaves (params, SGD momentum, BatchNorm statistics): as plain
dicts that is ~2.75 ms of host time per call on the H200 machine's host
(`benchmarks/state_dispatch.py`), and a step that is waited for pays it before the
device starts. `FlatForm` (config.state_layout 'flat', the default) carries the params,
the statistics and the momentum as one vector per dtype each: a handful of leaves.

The step slices the params vector into the model's arrays (XLA fuses the slices into
their consumers, the casts to the compute dtype) and runs the optimizer on the vectors
themselves, the gradient concatenated into the params' layout. Its update is then one
elementwise pass that writes the new params and momentum straight into the donated
buffers, and the norms in the metrics are one reduction each, where the tree makes one
update and two squared sums per array (R3D50: 168 arrays; the optimizer and metrics took
1.1 ms in 364 launches per step in the 2026-11-27 H200 trace).
The 2026-11-27 form packed the updated tree afterwards instead, an extra pass over the
state (+0.0 and +1.1 ms chained in two H200 rounds). Scalars (the step, optax's counts)
and PRNG keys stay leaves of their own, so `carried["step"]` reads as `state["step"]`.

Checkpoints, evaluation and everything outside the loop keep the tree (`TrainState`); the
loop converts at its edges (`FlatForm.jit_to_carried` / `jit_to_tree`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

FlatState = dict[str, jax.Array]
STATE_LAYOUTS = ("flat", "tree")  # config.state_layout


def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _is_kept(leaf) -> bool:
  """Leaves kept as they are: scalars (cheap, and read on the host) and PRNG keys (their
  dtype does not concatenate with others)."""
  return len(leaf.shape) == 0 or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a state tree sits in its flat form.

  slots[i] = (name, offset): leaf i is `flat[name][offset:offset + size].reshape(shape)`,
  or `flat[name]` itself where offset is None (a kept leaf).
  """
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  slots: tuple[tuple[str, int | None], ...]

  @classmethod
  def of(cls, state) -> FlatLayout:
    """The layout of `state` (arrays or ShapeDtypeStructs)."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    sizes: dict[str, int] = {}
    kept_names = set()
    slots = []
    for path, leaf in paths_and_leaves:
      if _is_kept(leaf):
        name = _path_name(path)
        kept_names.add(name)
        slots.append((name, None))
      else:
        name = np.dtype(leaf.dtype).name
        slots.append((name, sizes.get(name, 0)))
        sizes[name] = sizes.get(name, 0) + math.prod(leaf.shape)
    clash = kept_names & set(sizes)
    if clash:
      raise ValueError(f"State leaves named {sorted(clash)} clash with the buffers' names.")
    return cls(treedef=treedef, shapes=tuple(tuple(leaf.shape) for _, leaf in paths_and_leaves),
               slots=tuple(slots))

  @property
  def buffer_names(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for name, offset in self.slots if offset is not None))

  def flatten(self, state) -> FlatState:
    """The state tree -> {buffer or kept leaf name: array}. Traceable (used under jit)."""
    leaves = self.treedef.flatten_up_to(state)
    parts: dict[str, list[jax.Array]] = {name: [] for name in self.buffer_names}
    flat: FlatState = {}
    for leaf, (name, offset) in zip(leaves, self.slots):
      if offset is None:
        flat[name] = leaf
      else:
        parts[name].append(jnp.ravel(leaf))
    for name, arrays in parts.items():
      flat[name] = jnp.concatenate(arrays)
    return flat

  def unflatten(self, flat: FlatState):
    """{buffer or kept leaf name: array} -> the state tree. Traceable (used under jit)."""
    missing = set(self.buffer_names) | {n for n, offset in self.slots if offset is None}
    missing -= set(flat)
    if missing:
      raise KeyError(f"The flat state lacks {sorted(missing)}.")
    leaves = []
    for shape, (name, offset) in zip(self.shapes, self.slots):
      if offset is None:
        leaves.append(flat[name])
      else:
        size = math.prod(shape)
        leaves.append(jax.lax.slice_in_dim(flat[name], offset, offset + size).reshape(shape))
    return self.treedef.unflatten(leaves)


class TreeForm:
  """The train state carried as it is: every conversion is the identity."""

  def params_tree(self, params):
    return params

  def params_carried(self, params):
    return params

  batch_stats_tree = params_tree
  batch_stats_carried = params_carried

  def jit_to_carried(self, sharding: Sharding):
    del sharding
    return lambda state: state

  jit_to_tree = jit_to_carried


@dataclasses.dataclass(frozen=True)
class FlatForm:
  """The train state carried flat: params, BatchNorm statistics and every params-shaped
  part of the optimizer state (SGD's momentum) as one vector per dtype.

  The step slices the params vector into the model's arrays, concatenates their gradient
  into a vector of the same layout, and runs the optimizer on the vectors: its update is
  one elementwise pass over params, momentum and gradient, written into the donated
  buffers, and the gradient and param norms are one reduction each. optax's transforms
  act on any pytree, and these act elementwise (`optim.create_optimizer`: weight decay added
  to the gradient, then momentum), so the vectors get the same update as the tree.
  A transform with per-array statistics (LARS, per-layer clipping) would not.
  """
  params: FlatLayout
  batch_stats: FlatLayout
  opt_state_tree: Any  # the optimizer state in the tree form, as ShapeDtypeStructs

  @classmethod
  def of(cls, state) -> FlatForm:
    abstract = jax.eval_shape(lambda tree: tree, state)
    params = FlatLayout.of(abstract["params"])
    return cls(params=params, batch_stats=FlatLayout.of(abstract["batch_stats"]),
               opt_state_tree=abstract["opt_state"])

  def _is_params(self, node) -> bool:
    """A subtree of the optimizer state shaped like the params (momentum, Adam's moments)."""
    return jax.tree.structure(node) == self.params.treedef

  def params_tree(self, params: FlatState):
    return self.params.unflatten(params)

  def params_carried(self, params) -> FlatState:
    return self.params.flatten(params)

  def batch_stats_tree(self, batch_stats: FlatState):
    return self.batch_stats.unflatten(batch_stats)

  def batch_stats_carried(self, batch_stats) -> FlatState:
    return self.batch_stats.flatten(batch_stats)

  def to_carried(self, state):
    """The tree form -> the flat form. Traceable."""
    opt_state = jax.tree.map(
        lambda node: self.params.flatten(node) if self._is_params(node) else node,
        state["opt_state"], is_leaf=self._is_params)
    return {**state, "params": self.params.flatten(state["params"]),
            "batch_stats": self.batch_stats.flatten(state["batch_stats"]),
            "opt_state": opt_state}

  def to_tree(self, carried):
    """The flat form -> the tree form. Traceable."""
    opt_state = jax.tree.map(
        lambda like, node: self.params.unflatten(node) if self._is_params(like) else node,
        self.opt_state_tree, carried["opt_state"], is_leaf=self._is_params)
    return {**carried, "params": self.params.unflatten(carried["params"]),
            "batch_stats": self.batch_stats.unflatten(carried["batch_stats"]),
            "opt_state": opt_state}

  def jit_to_carried(self, sharding: Sharding):
    """`to_carried` jitted, its outputs placed with `sharding` (the state's, replicated)."""
    return jax.jit(self.to_carried, out_shardings=sharding)

  def jit_to_tree(self, sharding: Sharding):
    """`to_tree` jitted: fresh arrays, so the step may donate the carried ones after."""
    return jax.jit(self.to_tree, out_shardings=sharding)


StateForm = TreeForm | FlatForm


def form_for(config, state) -> StateForm:
  """How the training loop and the benchmark carry `state` between steps:
  `config.state_layout` 'flat' (the default, also for configs without the field) or
  'tree' (the state as it is)."""
  return FlatForm.of(state) if config.get("state_layout", "flat") == "flat" else TreeForm()
