"""XLA compile-option workarounds (tcvm_jax/xla_options.py) and their plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from tcvm_jax import finetune, mesh as mesh_lib, retrieval, summary, train_step, xla_options

# A name XLA rejects: a compile that got it fails naming it, so the option reached XLA.
BOGUS = {"xla_tcvm_no_such_option": True}


@pytest.mark.parametrize("backbone, platform, expected", [
    ("tsm50", "gpu", {"xla_gpu_enable_triton_gemm": False}),
    ("tsm_tiny", "cuda", {"xla_gpu_enable_triton_gemm": False}),
    ("r3d50", "gpu", None),
    ("r3d_tiny", "gpu", None),
    ("tsm50", "cpu", None),
    ("tsm50", "tpu", None),
])
def test_only_tsm_on_cuda_turns_triton_gemm_off(backbone, platform, expected):
  assert xla_options.compiler_options(backbone, platform) == expected


def test_options_are_a_fresh_dict_and_the_platform_is_the_mesh_devices():
  options = xla_options.compiler_options("tsm50", "gpu")
  options["xla_gpu_enable_triton_gemm"] = True
  assert xla_options.compiler_options("tsm50", "gpu") == {"xla_gpu_enable_triton_gemm": False}
  mesh = mesh_lib.create_mesh()
  assert xla_options.platform_of(mesh) == "cpu" == xla_options.platform_of()
  assert xla_options.for_mesh("tsm50", mesh) is None  # this CPU needs no workaround


def _expect_rejected(compile_fn):
  with pytest.raises(Exception, match="xla_tcvm_no_such_option"):
    compile_fn()


def test_the_train_steps_pass_their_options_to_xla():
  mesh = mesh_lib.create_mesh()
  state = {"w": jnp.ones(())}
  videos = jnp.zeros((len(jax.devices()), 2), jnp.float32)

  def step(state, videos):
    return state, {"loss": jnp.sum(videos) * state["w"]}

  pretrain = train_step.jit_train_step(step, mesh, compiler_options=BOGUS)
  _expect_rejected(lambda: pretrain.lower(state, videos).compile())
  # Without options the same step compiles: the failure above is the option's.
  train_step.jit_train_step(step, mesh).lower(state, videos).compile()

  def labelled_step(state, videos, labels):
    return state, {"loss": jnp.sum(videos) + jnp.sum(labels)}

  fine = finetune.jit_train_step(labelled_step, mesh, compiler_options=BOGUS)
  labels = jnp.zeros((len(jax.devices()),), jnp.int32)
  _expect_rejected(lambda: fine.lower(state, videos, labels).compile())


def test_the_view_runner_and_the_flop_count_pass_their_options_to_xla():
  mesh = mesh_lib.create_mesh()
  runner = retrieval.make_view_runner(lambda state, videos: videos.reshape(len(videos), -1)
                                      .astype(jnp.float32) * state, mesh, BOGUS)
  batch = {"video": np.zeros((2, 1, 2, 2, 3), np.uint8), "video_index": np.arange(2),
           "label": np.zeros(2, np.int32), "mask": np.ones(2, bool)}
  _expect_rejected(lambda: runner(jnp.ones(()), batch))
  config = get_config("demo")
  model = summary.abstract_model(config)
  _expect_rejected(lambda: summary.forward_flops(model.backbone, lambda b, x: b(x),
                                                 (1, 8, 16, 16, 3), BOGUS))


def test_summary_asks_for_the_workaround_of_its_backbone(monkeypatch):
  # As if on CUDA, with the workaround swapped for an option XLA rejects: the TSM summary
  # fails naming it, the R3D one does not ask for it.
  monkeypatch.setattr(xla_options, "platform_of", lambda mesh=None: "gpu")
  monkeypatch.setitem(xla_options._CUDA_WORKAROUNDS, "tsm", BOGUS)
  config = get_config("demo")
  config.model.backbone = "tsm_tiny"
  _expect_rejected(lambda: summary.summarize(config))
  config.model.backbone = "r3d_tiny"
  assert summary.summarize(config)
