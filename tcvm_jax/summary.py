r"""Parameter counts and forward FLOPs of the TCVM model a config builds.

  python -m tcvm_jax.summary --config=configs/pretrain.py          # R3D50, table
  python -m tcvm_jax.summary --config=configs/pretrain.py:demo --json

The model is built with `nnx.eval_shape` (no parameters are allocated); FLOPs come from
XLA's cost analysis of the compiled forward pass (eval mode, batch 1) and are reported
per clip, i.e. per pseudo-video of data.num_frames x output_size x output_size. XLA counts
a multiply-add as 2 FLOPs and skips kernel taps that fall on padding. The backbone's dense
multiply-adds (every tap, the fvcore convention papers use) are counted from the jaxpr.
For R3D50 at 32x112x112 the issue quotes 44.0 GMACs (~88 GFLOPs); the dense count gives
43.97 GMACs and XLA reports ~83.4 GFLOPs (41.2 GMACs of valid taps + BN/ReLU).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from tcvm_jax import model as model_lib
from tcvm_jax import xla_options
from tcvm_jax.flops import count_macs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (+ :preset).")
_JSON = flags.DEFINE_bool("json", False, "Print machine-readable JSON instead of a table.")

# The figure for R3D50 at 32x112x112, forward, per pseudo-video.
REFERENCE_R3D50_GMACS = 44.0


def count_params(module: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param); BatchNorm statistics are not counted."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def count_batch_stats(module: nnx.Module) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(module, nnx.BatchStat)))


def abstract_model(config: ml_collections.ConfigDict) -> model_lib.TCVM:
  """The model with ShapeDtypeStruct leaves: cheap even for R3D50."""
  return nnx.eval_shape(lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))


def parameter_table(model: model_lib.TCVM) -> list[tuple[str, int]]:
  """(name, #params) for the backbone, its stem and stages, and each head."""
  backbone = model.backbone
  rows = [("backbone", count_params(backbone)),
          ("backbone.stem", count_params(backbone.stem_conv) + count_params(backbone.stem_bn))]
  for stage_index, stage in enumerate(backbone.stages):
    rows.append((f"backbone.stages[{stage_index}]", count_params(stage)))
  rows.append(("tc_head", count_params(model.tc_head)))
  rows.append(("ofc_head", count_params(model.ofc_head)))
  return rows


def forward_flops(module: nnx.Module, apply: Callable[[nnx.Module, jax.Array], Any],
                  input_shape: tuple[int, ...],
                  compiler_options: dict[str, Any] | None = None) -> float:
  """XLA's FLOP count for `apply(module, x)` compiled at `input_shape`, eval mode (with
  XLA's `compiler_options`, `xla_options.for_mesh`)."""
  graphdef, state = nnx.split(module)

  def forward(state, inputs):
    return apply(nnx.merge(graphdef, state), inputs)

  compiled = jax.jit(forward, compiler_options=compiler_options).lower(
      state, jax.ShapeDtypeStruct(input_shape, jnp.float32)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost["flops"])


def dense_macs(module: nnx.Module, apply: Callable[[nnx.Module, jax.Array], Any],
               input_shape: tuple[int, ...]) -> int:
  """Multiply-adds of every conv and matmul, counting taps on padding too.

  This is the fvcore/ptflops convention that papers quote. XLA's cost analysis skips
  taps that fall on padding, so its count is a few percent lower for small frames.
  """
  graphdef, state = nnx.split(module)
  jaxpr = jax.make_jaxpr(lambda state, inputs: apply(nnx.merge(graphdef, state), inputs))(
      state, jax.ShapeDtypeStruct(input_shape, jnp.float32))
  return count_macs(jaxpr.jaxpr)


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything the command prints, as a dict (also handy in notebooks and tests)."""
  model = abstract_model(config)
  model.eval()
  rows = parameter_table(model)
  clip_shape = (1, config.data.num_frames, config.montage.output_size,
                config.montage.output_size, 3)
  options = xla_options.for_mesh(config.model.backbone)  # compiled on the default backend
  model_flops = forward_flops(model, lambda m, x: m(x), clip_shape, options)
  backbone_flops = forward_flops(model.backbone, lambda b, x: b(x), clip_shape, options)
  backbone_macs = dense_macs(model.backbone, lambda b, x: b(x), clip_shape)
  backbone_params = count_params(model.backbone)
  head_params = count_params(model.tc_head) + count_params(model.ofc_head)
  summary = {
      "backbone": config.model.backbone,
      "input_shape_per_clip": list(clip_shape[1:]),
      "backbone_params": backbone_params,
      "head_params": head_params,
      "tc_head_params": count_params(model.tc_head),
      "ofc_head_params": count_params(model.ofc_head),
      "total_params": backbone_params + head_params,
      "batch_stats": count_batch_stats(model),
      "params_by_module": dict(rows),
      "gflops_per_clip": model_flops / 1e9,
      "backbone_gflops_per_clip": backbone_flops / 1e9,
      "backbone_dense_gmacs_per_clip": backbone_macs / 1e9,
  }
  if config.model.backbone == "r3d50" and clip_shape[1:4] == (32, 112, 112):
    summary["reference_backbone_gmacs_per_clip"] = REFERENCE_R3D50_GMACS
  return summary


def format_table(summary: dict[str, Any]) -> str:
  lines = [f"{'module':<28}{'params':>14}", "-" * 42]
  for name, count in summary["params_by_module"].items():
    if name.startswith("backbone."):
      name = "  " + name.removeprefix("backbone.")
      if name.startswith("  stages["):  # res2..res5 in SlowFast/pytorchvideo naming.
        name += f" (res{int(name[len('  stages['):-1]) + 2})"
    lines.append(f"{name:<28}{count:>14,}")
  lines += ["-" * 42, f"{'total':<28}{summary['total_params']:>14,}",
            f"{'(BatchNorm statistics)':<28}{summary['batch_stats']:>14,}", ""]
  frames, height, width, _ = summary["input_shape_per_clip"]
  lines.append(f"forward GFLOPs per clip ({frames}x{height}x{width}, XLA cost analysis, "
               f"1 MAC = 2 FLOPs): model {summary['gflops_per_clip']:.2f}, backbone "
               f"{summary['backbone_gflops_per_clip']:.2f}")
  lines.append(f"backbone multiply-adds per clip counting padded taps (fvcore convention): "
               f"{summary['backbone_dense_gmacs_per_clip']:.2f} GMACs")
  if "reference_backbone_gmacs_per_clip" in summary:
    lines.append(f"issue's reference for R3D50 at 32x112x112: {REFERENCE_R3D50_GMACS} GMACs "
                 f"(~{2 * REFERENCE_R3D50_GMACS:.0f} GFLOPs); XLA skips taps on padding, "
                 f"hence its lower count")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  summary = summarize(_CONFIG.value)
  if _JSON.value:
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
  else:
    print(format_table(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
