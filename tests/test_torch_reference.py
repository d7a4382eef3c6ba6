"""The PyTorch reference (benchmarks/torch_reference.py, issue #6): the same network and the
same loss as the JAX model, its timed step, and the server benchmark.py --interleave
drives. Skipped as a whole where torch is not installed (it is optional; CI has none).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import benchmarks
from benchmarks import jax_step, torch_process
from configs import pretrain
from tcvm_jax import losses
from tcvm_jax.model import build_model
from train_test_utils import (FAST_COMPILE_XLA_FLAGS, REPO_ROOT, TINY_BENCHMARK_OVERRIDES,
                              tiny_benchmark_config)

# --- The PyTorch reference is the same network and the same loss -----------------------

torch = pytest.importorskip("torch", reason="torch is not installed; the PyTorch reference "
                            "is optional (pip install torch)")
from benchmarks import torch_reference  # noqa: E402  pylint: disable=wrong-import-position


def _reference_spec(config) -> torch_reference.ReferenceSpec:
  return torch_reference.ReferenceSpec(**benchmarks.torch_reference_spec(config))


@pytest.mark.parametrize("backbone", ["r3d_tiny", "tsm_tiny", "r3d50", "tsm50"])
def test_torch_reference_has_the_jax_parameter_counts(backbone):
  config = pretrain.get_config("demo" if "tiny" in backbone else "")
  config.model.backbone = backbone
  jax_counts = jax_step.parameter_counts(config)
  reference = torch_reference.TCVMReference(_reference_spec(config))
  assert torch_reference.count_parameters(reference.backbone) == jax_counts["backbone_params"]
  assert torch_reference.count_parameters(reference) == jax_counts["total_params"]


@pytest.mark.parametrize("positive_reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_torch_loss_matches_jax_loss(positive_reduction, temperature):
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(14, 16)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5, 5, 6])  # 3, 4 and 6: no positive
  jax_loss, _ = losses.multi_positive_infonce(jnp.asarray(embeddings), jnp.asarray(labels),
                                              temperature, positive_reduction)
  torch_loss = torch_reference.multi_positive_infonce(
      torch.from_numpy(embeddings), torch.from_numpy(labels), temperature, positive_reduction)
  np.testing.assert_allclose(float(torch_loss), float(jax_loss), rtol=1e-5)


def _random_jax_model(config, seed: int) -> nnx.Module:
  """The JAX model with random weights and BN affine params (no branch hides behind a zero
  init), built abstractly and filled from NumPy: no compilation per parameter shape."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  params, params_def = jax.tree.flatten(nnx.state(model, nnx.Param))
  params = [(0.3 * rng.normal(size=p.shape) + (1.0 if len(p.shape) == 1 else 0.0))
            .astype(np.float32) for p in params]
  stats = nnx.state(model, nnx.BatchStat)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, 1.0 if "var" in str(path[-1]) else 0.0, np.float32),
      stats)
  nnx.update(model, jax.tree.unflatten(params_def, params), stats)
  model.train()
  return model


def _copy_jax_weights(jax_model: nnx.Module, reference: torch.nn.Module, is_3d: bool) -> None:
  """Name-for-name copy: `a/b/0/conv_a/kernel` -> `a.b.0.conv_a.weight`, etc."""
  renames = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}
  targets = dict(reference.named_parameters())
  targets.update((name, buffer) for name, buffer in reference.named_buffers()
                 if not name.endswith("num_batches_tracked"))
  copied = set()
  for filter_ in (nnx.Param, nnx.BatchStat):
    for path, variable in nnx.to_flat_state(nnx.state(jax_model, filter_)):
      name = ".".join(str(p) for p in path[:-1]) + "." + renames[path[-1]]
      value = np.asarray(variable[...])
      if value.ndim == 5:  # (kt, kh, kw, Cin, Cout) conv kernel
        value = value.transpose(4, 3, 0, 1, 2) if is_3d else value[0].transpose(3, 2, 0, 1)
      elif value.ndim == 2:  # (in, out) dense kernel
        value = value.T
      assert targets[name].shape == value.shape, name
      with torch.no_grad():
        targets[name].copy_(torch.from_numpy(np.array(value, copy=True)))
      copied.add(name)
  assert copied == set(targets), set(targets) ^ copied


@pytest.mark.parametrize("backbone", ["r3d_tiny", "tsm_tiny"])
def test_torch_reference_computes_the_jax_function(backbone):
  config = tiny_benchmark_config(backbone)
  jax_model = _random_jax_model(config, seed=1)
  spec = _reference_spec(config)
  reference = torch_reference.TCVMReference(spec).train()
  _copy_jax_weights(jax_model, reference, spec.is_3d)

  videos = np.random.default_rng(2).normal(size=(4, 8, 32, 32, 3)).astype(np.float32)
  graphdef, state = nnx.split(jax_model)
  jax_outputs = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state,
                                                                         jnp.asarray(videos))
  with torch.no_grad():
    z_origin, z_diff = reference(torch_reference.to_backbone_layout(
        torch.from_numpy(videos), spec))
  for name, torch_value in (("z_origin", z_origin), ("z_diff", z_diff)):
    expected = np.asarray(jax_outputs[name])
    np.testing.assert_allclose(torch_value.numpy(), expected,
                               atol=2e-4 * np.abs(expected).max(), rtol=2e-3, err_msg=name)

  # And the objective: Eq. 3 on the 8 clips, labels as a montage would give them.
  labels = np.array([0, 1, 2, 3, 1, 0, 3, 2])
  objective = torch_reference.PretrainingObjective(reference)
  with torch.no_grad():
    torch_loss = objective(torch_reference.to_backbone_layout(torch.from_numpy(videos), spec),
                           torch.from_numpy(labels))
  num = labels.shape[0]
  jax_loss = 0.0
  for name, weight in (("z_origin", config.loss.alpha), ("z_diff", config.loss.beta)):
    value, _ = losses.multi_positive_infonce(jax_outputs[name].reshape(num, -1),
                                             jnp.asarray(labels), config.loss.temperature)
    jax_loss += weight * float(value)
  np.testing.assert_allclose(float(torch_loss), jax_loss, rtol=1e-3)


def test_torch_benchmark_step_runs():
  spec = _reference_spec(tiny_benchmark_config())
  figures = torch_reference.benchmark_train_step(spec, batch_size=2, steps=3, warmup=0)
  assert figures["step_time_s"] == pytest.approx(float(np.median(figures["step_times_s"])))
  assert figures["videos_per_s"] == pytest.approx(2 / figures["step_time_s"])
  assert figures["includes_montage"] is False and figures["compiled"] is False
  assert math.isfinite(figures["final_loss"])
  with pytest.raises(ValueError, match="dtype"):
    torch_reference.benchmark_train_step(spec, batch_size=2, dtype="float16")


def test_torch_step_server_times_one_step_per_request():
  """serve_steps: "ready" after the warm-up, one positive time per "step", stops on "stop";
  an unknown request is an error, not a silent skip."""
  import io  # pylint: disable=g-import-not-at-top
  step = torch_reference.build_train_step(_reference_spec(tiny_benchmark_config()), batch_size=2)
  replies = io.StringIO()
  count = torch_reference.serve_steps(step, warmup=1, commands=io.StringIO(
      "step\nstep\nstop\nstep\n"), replies=replies)
  lines = replies.getvalue().splitlines()
  assert count == 2 and lines[0] == "ready" and len(lines) == 3
  assert all(float(line) > 0 for line in lines[1:])
  with pytest.raises(ValueError, match="unknown command"):
    torch_reference.serve_steps(step, warmup=0, commands=io.StringIO("go\n"),
                                replies=io.StringIO())


def test_benchmark_interleaves_torch_in_its_own_process(tmp_path):
  """--interleave: rounds of blocks, the first step of each block kept apart, torch served
  by its own process; a block of 1 (nothing counted) is refused."""
  json_path = tmp_path / "bench.json"
  script = os.path.join(REPO_ROOT, "scripts", "benchmark.py")
  base = [sys.executable, script, *TINY_BENCHMARK_OVERRIDES, "--batch_size=2", "--steps=1",
          "--warmup=0", "--no_torch", "--interleave=2", f"--json={json_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  refused = subprocess.run([*base, "--interleave_block=1"], capture_output=True, text=True,
                           env=env, cwd=REPO_ROOT, timeout=600)
  assert refused.returncode != 0 and "interleave_block" in refused.stderr
  completed = subprocess.run([*base, "--interleave_block=3"], capture_output=True, text=True,
                             env=env, cwd=REPO_ROOT, timeout=900)
  assert completed.returncode == 0, completed.stderr[-3000:]
  interleaved = json.loads(json_path.read_text())["interleaved"]
  assert interleaved["torch_process"].startswith("separate")
  assert interleaved["rounds"] == 2 and interleaved["steps_counted"] == 4
  for name in ("jax", "jax_model_only", "torch"):
    assert len(interleaved[f"{name}_step_times_s"]) == 4
    assert len(interleaved["first_in_block_step_times_s"][name]) == 2
  assert interleaved["ratio"] == pytest.approx(
      interleaved["torch_step_time_s"] / interleaved["jax_step_time_s"])


def test_torch_step_server_reports_a_failed_start(capfd):
  """A server that dies before "ready" is an error naming the exit, not a hang."""
  request = dict(benchmarks.torch_reference_spec(tiny_benchmark_config()), batch_size=0,
                 dtype="float32", warmup=0)
  with pytest.raises(RuntimeError, match="exited"):
    torch_process.TorchStepServer(request, timeout_s=300)
  assert "batch_size" in capfd.readouterr().err  # the server's own message reaches stderr


def test_torch_step_server_serves_steps():
  request = dict(benchmarks.torch_reference_spec(tiny_benchmark_config()), batch_size=2,
                 dtype="float32", warmup=1)
  server = torch_process.TorchStepServer(request, timeout_s=300)
  try:
    times = [server.step() for _ in range(3)]
  finally:
    server.close()
  assert all(t > 0 for t in times)
  assert server._process.returncode == 0  # pylint: disable=protected-access  # "stop" ended it


def test_torch_step_server_that_dies_mid_run_is_an_error():
  request = dict(benchmarks.torch_reference_spec(tiny_benchmark_config()), batch_size=2,
                 dtype="float32", warmup=0)
  server = torch_process.TorchStepServer(request, timeout_s=300)
  try:
    server.step()
    server._process.kill()  # pylint: disable=protected-access
    server._process.wait()  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match="exited"):
      server.step()
  finally:
    server.close()


def test_torch_step_server_that_does_not_answer_is_killed():
  # 50 ms is far less than importing torch takes: no "ready" in time.
  request = dict(benchmarks.torch_reference_spec(tiny_benchmark_config()), batch_size=2,
                 dtype="float32", warmup=0)
  with pytest.raises(RuntimeError, match="sent no ready in 0.05 s"):
    torch_process.TorchStepServer(request, timeout_s=0.05)
