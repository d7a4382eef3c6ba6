"""Multiply-accumulate counts read off a jaxpr (shared by the summary and the benchmark).

Every convolution and matrix product counts all its kernel taps, padding included: the
fvcore/ptflops convention that papers quote. XLA's cost analysis skips taps that land on
padding, so its count is a few percent lower for small frames.
"""

from __future__ import annotations

import math
from typing import Any, Iterator


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
  """Jaxprs nested in an equation's params (pjit, custom_jvp, remat, scan, cond...)."""
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(item, "eqns"):  # Jaxpr
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # ClosedJaxpr
        yield item.jaxpr


def count_macs(jaxpr) -> int:
  """Multiply-accumulates of every convolution and matrix product in a jaxpr (recursive)."""
  macs = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      kernel_shape = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      taps = math.prod(kernel_shape[d] for d in rhs_spec[2:]) * kernel_shape[rhs_spec[1]]
      macs += math.prod(eqn.outvars[0].aval.shape) * taps
    elif name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      macs += math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[d] for d in lhs_contracting)
    if name == "cond":
      # One branch runs. The model's conds are lax.platform_dependent's per-platform forms
      # of one computation: count the cheapest, the model's own arithmetic; the others add
      # work of their layout (the block stem's zero taps on CUDA, +4 % on R3D50).
      macs += min((count_macs(branch.jaxpr) for branch in eqn.params["branches"]), default=0)
      continue
    for sub_jaxpr in _sub_jaxprs(eqn.params):
      macs += count_macs(sub_jaxpr)
  return macs
