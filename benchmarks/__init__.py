"""Benchmark helpers for scripts/benchmark.py (issue #6).

Not part of the `tcvm_jax` package: `torch_reference` imports PyTorch, which the package
must never need. Nothing here imports TensorFlow or clu (the GPU machine has neither), and
this file imports nothing heavy, so the JAX process can use it without loading torch.
"""

from __future__ import annotations

from typing import Any


def torch_reference_spec(config) -> dict[str, Any]:
  """The fields of `torch_reference.ReferenceSpec` read off a pretraining config."""
  model, loss = config.model, config.loss
  return {
      "backbone": model.backbone,
      "num_frames": config.data.num_frames,
      "num_clips": config.montage.num_clips,
      "frame_size": config.montage.output_size,
      "tc_k": model.tc_k,
      "tc_second_order": model.tc_second_order,
      "tc_hidden_dim": model.tc_hidden_dim,
      "ofc_hidden_dim": model.ofc_hidden_dim,
      "ofc_dim": model.ofc_dim,
      "bn_momentum": model.bn_momentum,
      "temperature": loss.temperature,
      "alpha": loss.alpha,
      "beta": loss.beta,
      "positive_reduction": loss.positive_reduction,
      # optim.peak_learning_rate: linear scaling from a batch of 32.
      "learning_rate": config.base_learning_rate * config.batch_size / 32,
      "momentum": config.momentum,
      "weight_decay": config.weight_decay,
      # The montage + augmentation (benchmarks/torch_montage.py).
      "input_size": config.data.input_size,
      "montage_variant": config.montage.variant,
      "augment": config.augment.to_dict(),
  }
