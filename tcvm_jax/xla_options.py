"""XLA compile options that a program needs on a platform: workarounds for compiler bugs.

On CUDA, JAX 0.11.2's XLA aborts the process while compiling the TSM50 training step
with its Triton GEMM fusions on: "triton_tiling_propagation.cc:703 Check failed:
subdim_size_accumulator == dim_size (196 vs. 28)" (H200, 2026-11-26; the same with either
model.bn_statistics). With `xla_gpu_enable_triton_gemm=False` (cuBLAS for its matmuls) the
same step compiled and ran (42.7 ms per step at B = 32, bf16, while three other compiles
shared the GPU). R3D50 compiles with Triton GEMMs and keeps them (its matmul fusions are
part of its measured speed). Every program that holds a TSM backbone gets the option on
CUDA: the pretraining and fine-tuning steps, the retrieval/evaluation forward passes and
the model summary's FLOP count. The likely trigger, not checked on a GPU: since 1x1
convolutions became reshape + 2D matmul (for the CPU), the temporal shift's concatenation
can feed a Triton GEMM fusion; TSM50 compiled with Triton GEMMs before that change.
`model.tsm_shift='barrier'` (backbones.temporal_shift) keeps the shift out of every GEMM
fusion; `scripts/gpu_session.sh` compiles and times TSM50 with it and Triton GEMMs on, to
narrow or drop this workaround.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

# backbone name prefix -> the options it needs on CUDA ('gpu' is JAX's platform name).
_CUDA_WORKAROUNDS = {"tsm": {"xla_gpu_enable_triton_gemm": False}}


def platform_of(mesh: Mesh | None = None) -> str:
  """The mesh's devices' platform ('cpu', 'gpu', 'tpu'), or the default backend's."""
  if mesh is None:
    return jax.default_backend()
  return mesh.devices.flat[0].platform


def compiler_options(backbone: str, platform: str) -> dict[str, Any] | None:
  """Options for `jax.jit(..., compiler_options=)` of a program holding `backbone` on
  `platform`; None when it needs none."""
  if platform not in ("gpu", "cuda"):
    return None
  for prefix, options in _CUDA_WORKAROUNDS.items():
    if backbone.startswith(prefix):
      return dict(options)
  return None


def for_mesh(backbone: str, mesh: Mesh | None = None) -> dict[str, Any] | None:
  """`compiler_options` for `backbone` (a name, not 'auto') on the mesh's platform, or on
  the default backend's without a mesh."""
  return compiler_options(backbone, platform_of(mesh))
