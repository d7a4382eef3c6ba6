"""The training step lowered from this CPU for the other platforms: a GPU or TPU session
starts from a program that lowers, with each platform's defaults in it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from configs.pretrain import get_config
from tcvm_jax import mesh as mesh_lib, optim, train_step


def _lowered_step(backbone: str, platform: str) -> str:
  config = get_config("demo")
  config.model.backbone = backbone
  config.batch_size = 4
  mesh = mesh_lib.create_mesh()
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch=10, num_train_steps=100)
  graphdef, state = train_step.create_train_state(config, mesh, optimizer)
  size = config.data.input_size
  videos = jnp.zeros((config.batch_size, config.data.num_frames, size, size, 3), jnp.uint8)
  step = train_step.jit_train_step(
      train_step.make_train_step(config, graphdef, mesh, optimizer, schedule), mesh)
  return step.trace(state, videos).lower(lowering_platforms=(platform,)).as_text()


def _variadic_reductions(text: str) -> int:
  return text.count(":2 = stablehlo.reduce(")


def _bfloat16_ops(text: str) -> int:
  # Constants of every platform's branch are hoisted into each lowering, unused: skip them.
  return sum("xbf16>" in line and "stablehlo.constant" not in line
             for line in text.splitlines())


@pytest.mark.parametrize("backbone", ["r3d_tiny", "tsm_tiny"])
def test_the_step_lowers_for_cuda_and_tpu_with_their_defaults(backbone):
  texts = {platform: _lowered_step(backbone, platform) for platform in ("cpu", "cuda", "tpu")}
  # CUDA: BatchNorm's sums as one reduction (one per BatchNorm at least, on top of what the
  # other platforms have) and the augmentation's planes in bfloat16 (the demo model is
  # float32, so no other bfloat16 op).
  assert _variadic_reductions(texts["cuda"]) >= _variadic_reductions(texts["cpu"]) + 10
  assert _bfloat16_ops(texts["cuda"]) > 0
  for platform in ("cpu", "tpu"):
    assert _variadic_reductions(texts[platform]) == _variadic_reductions(texts["cpu"])
    assert _bfloat16_ops(texts[platform]) == 0, platform
