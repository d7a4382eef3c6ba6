"""The training step lowered from this CPU for the other platforms: a GPU or TPU session
starts from a program that lowers, with each platform's defaults in it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks import ab_rounds
from configs.pretrain import get_config
from tcvm_jax import mesh as mesh_lib, optim, train_step
from train_test_utils import bfloat16_ops, gpu_session_variants, variadic_reductions


@functools.cache  # several tests compare against the same default programs
def _lowered_step(backbone: str, platform: str, augment_fields=(), overrides=(),
                  **model_fields) -> str:
  """The demo step's StableHLO for `platform`. `augment_fields`: (field, value) pairs;
  `overrides`: ('a.b', text) pairs as the A/B scripts take them (`--config.a.b=text`)."""
  config = get_config("demo")
  config.model.backbone = backbone
  config.batch_size = 4
  for field, value in model_fields.items():
    config.model[field] = value
  for field, value in dict(augment_fields).items():
    config.augment[field] = value
  if overrides:
    config = ab_rounds.apply_overrides(config, dict(overrides))
  mesh = mesh_lib.create_mesh()
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch=10, num_train_steps=100)
  graphdef, state = train_step.create_train_state(config, mesh, optimizer)
  size = config.data.input_size
  videos = jnp.zeros((config.batch_size, config.data.num_frames, size, size, 3), jnp.uint8)
  step = train_step.jit_train_step(
      train_step.make_train_step(config, graphdef, mesh, optimizer, schedule), mesh)
  return step.trace(state, videos).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("backbone", ["r3d_tiny", "tsm_tiny"])
def test_the_step_lowers_for_cuda_and_tpu_with_their_defaults(backbone):
  texts = {platform: _lowered_step(backbone, platform) for platform in ("cpu", "cuda", "tpu")}
  # CUDA: BatchNorm's sums as one reduction (one per BatchNorm at least, on top of what the
  # other platforms have) and the augmentation's planes in bfloat16 (the demo model is
  # float32, so no other bfloat16 op).
  assert variadic_reductions(texts["cuda"]) >= variadic_reductions(texts["cpu"]) + 10
  assert bfloat16_ops(texts["cuda"]) > 0
  for platform in ("cpu", "tpu"):
    assert variadic_reductions(texts[platform]) == variadic_reductions(texts["cpu"])
    assert bfloat16_ops(texts[platform]) == 0, platform


def test_the_cuda_defaults_and_the_gpu_session_variants_lower_for_cuda():
  # What a GPU session compiles (scripts/gpu_session.sh): a program that does not even
  # lower would cost that rare session its A/B. The demo's stem (7x7 / 2, 3 -> 8
  # channels, 56-px frames) trains on CUDA by default ('auto') in the block layout, as a
  # 3x3 conv from 48 to 32 channels (4 x 8: a block of 2 x 2 output pixels); in the pixel
  # layout as a 4x4 conv over 12 channels (space-to-depth). The colour jitter ('auto')
  # is one Pallas kernel on CUDA: one Triton call in the step. Elsewhere neither.
  auto = _lowered_step("r3d_tiny", "cuda")
  pixels = _lowered_step("r3d_tiny", "cuda", stem_layout="pixels",
                         block_relu_gradient="from_output",
                         augment_fields=(("jitter_kernel", "xla"),))
  on_cpu = _lowered_step("r3d_tiny", "cpu")
  # The block stem's pool backward by selects: the two stacks of its pixels' gradients go.
  selected = _lowered_step("r3d_tiny", "cuda", stem_pool_gradient="select")
  concatenate = "stablehlo.concatenate"
  assert selected.count(concatenate) == auto.count(concatenate) - 3  # 3 stacks: 2 + 1
  blocks_kernel, pixels_kernel = "tensor<3x3x48x32xf32>", "tensor<4x4x12x8xf32>"
  assert blocks_kernel in auto and pixels_kernel not in auto
  assert pixels_kernel in pixels and blocks_kernel not in pixels
  assert blocks_kernel not in on_cpu
  triton_call = "stablehlo.custom_call @__gpu$xla.gpu.triton"
  assert auto.count(triton_call) == 1
  assert pixels.count(triton_call) == 0 and on_cpu.count(triton_call) == 0


@pytest.mark.parametrize("variants, backbone", [("LEVERS", "r3d_tiny"),
                                               ("TSM_TRITON_VARIANTS", "tsm_tiny")])
def test_the_gpu_session_variants_lower_for_cuda_each_a_program_of_its_own(variants,
                                                                          backbone):
  # The config variants of gpu_session.sh's A/Bs (R3D50's LEVERS, TSM50's Triton GEMM
  # ones): each must lower for CUDA and change the CUDA program, else it costs the rare
  # GPU session a compile and cannot win (benchmarks/ab_winners.py: same program as the
  # default); no two may be the same.
  programs = {"default": _lowered_step(backbone, "cuda")}
  for name, _, _, overrides in ab_rounds.option_variants(gpu_session_variants(variants)):
    if overrides:  # XLA flags alone act after lowering
      programs[name] = _lowered_step(backbone, "cuda", overrides=tuple(overrides.items()))
  assert len(set(programs.values())) == len(programs), list(programs)


def test_the_fused_1x1_convs_lower_for_cuda_as_triton_calls():
  # model.conv1x1_kernel='pallas' (gpu_session.sh's A/B): one Triton call per 1x1 conv
  # whose shapes tile into blocks of >= 16, and one more for the input gradient of each
  # of those with bn_b + ReLU in front. The demo's r3d_tiny (width 8, 4 pseudo-videos of
  # 8 x 56 x 56, 14 x 14 after the stem) has 4 + 3: stage 2's conv_a (32 -> 16 channels,
  # 1568 rows) and the conv_c of stages 2-4 (16 -> 64, 32 -> 128, 64 -> 256; these have
  # bn_b in front). Stage 1's convs have 8 input channels; stages 3-4's conv_a is
  # (3, 1, 1); strided shortcuts stay matmuls. On the CPU the same model is XLA ops.
  triton_call = "stablehlo.custom_call @__gpu$xla.gpu.triton"
  auto = _lowered_step("r3d_tiny", "cuda")
  fused = _lowered_step("r3d_tiny", "cuda", conv1x1_kernel="pallas")
  assert fused.count(triton_call) - auto.count(triton_call) == 4 + 3
  assert _lowered_step("r3d_tiny", "cpu", conv1x1_kernel="pallas").count(triton_call) == 0
