"""The train state as one flat buffer per dtype at the jitted step's boundary (#6).

Each jitted call flattens its arguments and builds its results leaf by leaf on the host.
R3D50's train state has 447 leaves (params, SGD momentum, BatchNorm statistics): as plain
dicts that is ~2.75 ms of host time per call on the H200 machine's host
(`benchmarks/state_dispatch.py`), and a step that is waited for pays it before the
device starts. Packed into one 1-D buffer per dtype the state has a handful of leaves.

Inside the step `unflatten` slices the buffers back into the tree (XLA fuses the slices
into their consumers: the casts to the compute dtype, the SGD update) and `flatten`
concatenates the new state: one pass over it that the tree does not make (R3D50's
params, momentum and statistics, ~0.33 GB read and written: ~0.2 ms on an H200, where
the chained step measured +0.0 and +1.1 ms in two rounds against the tree, and the waited
one -2.0 ms). Writing each leaf into the donated buffer in place
(`dynamic_update_slice`) instead made XLA:CPU copy the whole buffer twice. Scalars (the
step, optax's counts) and PRNG keys stay leaves of their own, named by their path, so
`flat["step"]` reads as `state["step"]` does.

Checkpoints, evaluation and everything outside the loop keep the tree (`TrainState`); the
loop converts at its edges (`FlatLayout.jit_flatten` / `jit_unflatten`).
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

  def jit_flatten(self, sharding: Sharding):
    """`flatten` jitted, its outputs placed with `sharding` (the state's, replicated)."""
    return jax.jit(self.flatten, out_shardings=sharding)

  def jit_unflatten(self, sharding: Sharding):
    """`unflatten` jitted: fresh arrays, so the step may donate the flat buffers after."""
    return jax.jit(self.unflatten, out_shardings=sharding)


def layout_for(config, state) -> FlatLayout | None:
  """How the training loop and the benchmark carry `state` between steps:
  `config.state_layout` 'flat' (the default, also for configs without the field) gives
  its layout, 'tree' None (the state as it is)."""
  return FlatLayout.of(state) if config.get("state_layout", "flat") == "flat" else None


def flat_step(step, layout: FlatLayout):
  """`(state, *batch) -> (state, metrics)` as `(flat, *batch) -> (flat, metrics)`."""

  def step_on_flat(flat: FlatState, *batch):
    state, metrics = step(layout.unflatten(flat), *batch)
    return layout.flatten(state), metrics

  return step_on_flat
