"""The pretraining step as a pure function: montage -> encoder -> TC/OFC heads -> loss -> SGD.

`TrainState` is a plain dict pytree of arrays, so orbax saves it as it is, and a jitted
call flattens it in C++: with R3D50's ~450 nnx Variables in it (params, optimizer state,
statistics) each call took ~5 ms of host time against ~1 ms as dicts (docs/performance.md).
`nnx.merge` takes the dicts back inside the step. Between steps the training loop and
the benchmark carry it flatter still: params, statistics and momentum as one vector per
dtype, updated as vectors (`flat_state.FlatForm`, `config.state_layout`; the step's
`form=` argument).
  step        int32 scalar, the number of updates applied so far.
  params      nested dict of the model's nnx.Param values (float32), keyed like the module.
  batch_stats nested dict of its nnx.BatchStat values (BatchNorm running averages).
  opt_state   optax state.
  rng         the run's base PRNG key; step keys are fold_in(rng, step), so a resumed run
              draws exactly the montage and augmentation it would have drawn.

The step is jitted over a mesh with a `data` axis: videos and pseudo-videos are sharded
over it, everything in the state is replicated. The montage runs in `shard_map` (clips
change devices); the model and loss are written for the global batch and XLA partitions
them, so BatchNorm statistics and the loss denominator cover the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from tcvm_jax import flat_state, losses, mesh as mesh_lib, montage as montage_lib, optim
from tcvm_jax.model import build_model

TrainState = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype={config.model.dtype!r}; choose from {tuple(DTYPES)}.")
  return DTYPES[config.model.dtype]


def abstract_model(config: ml_collections.ConfigDict):
  """The model's graph definition and abstract params and batch statistics (nested dicts
  of ShapeDtypeStructs, as in `TrainState`), without allocating parameters."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  model.train()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh,
                       optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters on device, replicated over the mesh."""
  graphdef, _, _ = abstract_model(config)

  def init(seed_key):
    init_key, run_key = jax.random.split(seed_key)
    model = build_model(config, rngs=nnx.Rngs(init_key))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": optimizer.init(params),
        "rng": run_key,
    }

  replicated = mesh_lib.replicated_sharding(mesh)
  state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
  return graphdef, state


def pretraining_loss(outputs: dict[str, jax.Array], source_ids: jax.Array,
                     loss_config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
  """L = alpha * L_origin + beta * L_diff (Eq. 3); labels are the clips' source videos."""
  labels = source_ids.reshape(-1)  # (B * s,)
  loss_fn = functools.partial(losses.multi_positive_infonce,
                              temperature=loss_config.temperature,
                              positive_reduction=loss_config.positive_reduction)
  z_origin = outputs["z_origin"].reshape(labels.shape[0], -1)
  z_diff = outputs["z_diff"].reshape(labels.shape[0], -1)
  loss_origin, metrics_origin = loss_fn(z_origin, labels)
  loss_diff, metrics_diff = loss_fn(z_diff, labels)
  loss = loss_config.alpha * loss_origin + loss_config.beta * loss_diff
  metrics = {"loss": loss, "loss_origin": loss_origin, "loss_diff": loss_diff}
  metrics.update({f"origin_{k}": v for k, v in metrics_origin.items()})
  metrics.update({f"diff_{k}": v for k, v in metrics_diff.items()})
  return loss, metrics


def make_update_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                     optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                     form: flat_state.StateForm = flat_state.TreeForm()
                     ) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """The step after the montage, un-jitted: `(state, pseudo_videos (B, T, S, S, 3) float,
  source_ids (B, s)) -> (state, metrics)`: encoder, heads, loss, gradient, SGD update.
  (The benchmark times it alone against the PyTorch reference, which has no montage.)
  `form`: how the state is carried (`flat_state.form_for`); the step takes and returns
  it in that form, and a flat one is updated flat."""

  def update_step(state: TrainState, pseudo_videos: jax.Array, source_ids: jax.Array):
    batch_stats_tree = form.batch_stats_tree(state["batch_stats"])

    def loss_fn(params):
      # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
      model = nnx.merge(graphdef, params, batch_stats_tree, copy=True)
      outputs = model(pseudo_videos)
      loss, metrics = pretraining_loss(outputs, source_ids, config.loss)
      return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, batch_stats)), grads = grad_fn(form.params_tree(state["params"]))
    grads = form.params_carried(grads)
    batch_stats = form.batch_stats_carried(batch_stats)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["learning_rate"] = schedule(state["step"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  return update_step


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    form: flat_state.StateForm = flat_state.TreeForm()
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """Returns the un-jitted step `(state, videos uint8 (B, T, H, W, 3)) -> (state, metrics)`,
  the state carried in `form` (`make_update_step`)."""
  montage = montage_lib.make_montage_fn(config, mesh)
  update_step = make_update_step(config, graphdef, optimizer, schedule, form)

  def train_step(state: TrainState, videos: jax.Array):
    step_key = jax.random.fold_in(state["rng"], state["step"])
    pseudo_videos, source_ids = montage(videos, step_key)
    return update_step(state, pseudo_videos, source_ids)

  return train_step


def jit_train_step(train_step, mesh: Mesh, donate: bool = True, num_batch_args: int = 1,
                   compiler_options: dict[str, Any] | None = None):
  """Jits the step: state replicated (and donated), the `num_batch_args` arguments after
  it (videos; or pseudo-videos and source ids for `make_update_step`) sharded over
  `data`. `compiler_options`: XLA's (`xla_options.for_mesh`)."""
  replicated = mesh_lib.replicated_sharding(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated,) + (mesh_lib.batch_sharding(mesh),) * num_batch_args,
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
