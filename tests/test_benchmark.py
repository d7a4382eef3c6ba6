"""The benchmark suite (issue #6): the script's JSON, FLOP/MAC counting, collectives, and a
PyTorch reference that is the same network and the same loss as the JAX model."""

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
from benchmarks import jax_step
from configs import pretrain
from tcvm_jax import host_memory, losses
from tcvm_jax.model import build_model
from train_test_utils import FAST_COMPILE_XLA_FLAGS, TINY_BENCHMARK_OVERRIDES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the script with TensorFlow and clu made unimportable: the GPU machine has neither.
_RUN_WITHOUT_TF = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'clu'):
      raise ImportError(f'{name} is blocked: the GPU machine does not have it')
    return None
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _tiny_config(backbone: str = "r3d_tiny"):
  """The config of TINY_BENCHMARK_OVERRIDES, as an object."""
  config = pretrain.get_config("demo")
  config.data.num_frames = 8
  config.montage.num_clips = 2
  config.data.input_size = 40
  config.montage.output_size = 32
  config.model.ofc_hidden_dim = 32
  config.model.ofc_dim = 16
  config.model.backbone = backbone
  return config


def test_benchmark_script_writes_complete_json(tmp_path):
  json_path = tmp_path / "bench.json"
  command = [sys.executable, "-c", _RUN_WITHOUT_TF, os.path.join(REPO_ROOT, "scripts",
                                                                  "benchmark.py"),
             *TINY_BENCHMARK_OVERRIDES, "--batch_size=4", "--steps=2", "--warmup=1", "--no_torch",
             "--scaling_devices=2", "--scaling_per_device_batch=2", f"--json={json_path}"]
  # This test checks what is reported, not speed: compile fast (the scaling child inherits).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                             timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = json.loads(json_path.read_text())

  for key in ("device", "device_kind", "date", "config", "batch_size", "dtype", "step_time_s",
              "videos_per_s", "flops_per_step", "mfu", "peak_memory_bytes", "montage_share",
              "torch_step_time_s", "torch_ratio", "input_clips_per_s_per_core", "scaling"):
    assert key in results, key
  assert results["device_kind"] == "cpu" and results["num_devices"] == 1
  assert results["batch_size"] == 4 and results["dtype"] == "float32"
  assert results["num_frames"] == 8 and results["frame_size"] == 32
  # CPU: no known peak, so no MFU; no torch run, so no ratio.
  assert results["mfu"] is None and results["model_mfu"] is None
  assert results["torch_ratio"] is None and results["torch_step_time_s"] is None
  assert results["input_clips_per_s_per_core"] is None and results["interleaved"] is None
  assert results["partial"] is False
  assert not results["tensorflow_imported"] and not results["clu_imported"]
  # JAX_PLATFORMS=cpu: 'auto' keeps freed host memory (tcvm_jax/host_memory.py).
  assert results["host_memory_retained"] is host_memory._is_glibc_linux()

  step = results["step_time_s"]
  assert step > 0 and len(results["step_times_s"]) == 2
  assert step == pytest.approx(float(np.median(results["step_times_s"])))
  assert results["videos_per_s"] == pytest.approx(4 / step)
  assert math.isfinite(results["final_loss"])
  # Model FLOPs = 6 x forward MACs x batch, MACs counted independently below.
  macs = jax_step.forward_macs_per_video(_tiny_config())["model"]
  assert results["forward_macs_per_video"] == macs
  assert results["model_flops_per_step"] == pytest.approx(6 * macs * 4)
  # XLA's count covers at least the forward pass (2 x MACs) and is not absurdly larger.
  assert 2 * macs * 4 < results["flops_per_step"] < 20 * macs * 4
  assert results["flops_per_s"] == pytest.approx(results["flops_per_step"] / step)
  assert results["montage_time_s"] > 0
  assert results["montage_share"] == pytest.approx(results["montage_time_s"] / step)
  assert results["params"]["jax_backbone"] < results["params"]["jax_total"]

  # Two simulated devices, 2 videos each: the montage gathers the uint8 clips it needs.
  (entry,) = results["scaling"]
  assert "error" not in entry, entry
  assert entry["num_devices"] == 2 and entry["global_batch"] == 4
  assert entry["videos_per_s"] == pytest.approx(4 / entry["step_time_s"])
  assert entry["videos_per_s_per_device"] == pytest.approx(entry["videos_per_s"] / 2)
  video_bytes = 8 * 40 * 40 * 3  # one uint8 source video
  assert 0 < entry["montage_exchange_bytes_per_device"] <= 4 * video_bytes
  assert entry["step_collective_bytes_per_device"] > 0  # gradient all-reduce at least


def test_step_without_montage_is_the_step_after_the_montage():
  config = _tiny_config()
  config.batch_size = 4
  full = jax_step.CompiledStep(config)
  model_only = jax_step.CompiledStep(config, without_montage=True)
  pseudo_videos, source_ids = model_only.inputs
  assert pseudo_videos.shape == (4, 8, 32, 32, 3) and pseudo_videos.dtype == jnp.float32
  assert source_ids.shape == (4, 2)
  # Same initial state, and the montage of the full step's first step: same update.
  full_metrics, model_metrics = full.run_blocking(), model_only.run_blocking()
  for name in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(model_metrics[name], full_metrics[name], rtol=1e-5)
  full_params = jax.tree_util.tree_leaves(full.state["params"])
  model_params = jax.tree_util.tree_leaves(model_only.state["params"])
  for a, b in zip(full_params, model_params):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(model_only.state["step"]) == 1


def test_count_macs_matches_brute_force_formulas():
  lhs = jax.ShapeDtypeStruct((2, 9, 8, 6), jnp.float32)  # NHWC
  kernel = jax.ShapeDtypeStruct((3, 3, 3, 10), jnp.float32)  # HWIO, groups=2 -> Cin/2 = 3

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (2, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=2)

  # Output (2, 5, 8, 10); each output reads 3x3 pixels x 3 channels of its group.
  assert jax_step.count_macs(jax.make_jaxpr(conv)(lhs, kernel).jaxpr) == 2 * 5 * 8 * 10 * 27

  def nested(a, b):  # a matmul inside jit inside grad, plus a batched einsum
    inner = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
    return inner(a, b).sum()

  a = jax.ShapeDtypeStruct((4, 3, 5), jnp.float32)
  b = jax.ShapeDtypeStruct((4, 5, 7), jnp.float32)
  assert jax_step.count_macs(jax.make_jaxpr(nested)(a, b).jaxpr) == 4 * 3 * 5 * 7
  # Backward adds the two gradient products, each as large as the forward.
  grad_jaxpr = jax.make_jaxpr(jax.grad(nested, argnums=(0, 1)))(a, b).jaxpr
  assert jax_step.count_macs(grad_jaxpr) == 3 * 4 * 3 * 5 * 7

  # Per-backend versions of one op (lax.platform_dependent, a cond): one branch runs.
  def per_backend(a, b):
    small = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
    twice = lambda a, b: small(a, b) + small(a, b)
    return jax.lax.platform_dependent(a, b, cpu=small, default=twice)

  assert jax_step.count_macs(jax.make_jaxpr(per_backend)(a, b).jaxpr) == 2 * 4 * 3 * 5 * 7


def test_r3d50_forward_macs_match_the_issue():
  # Issue #6: "forward is 44.0 GMACs per pseudo-video" (R3D50, 32x112x112).
  macs = jax_step.forward_macs_per_video(pretrain.get_config(""))
  assert macs["backbone"] == pytest.approx(44.0e9, rel=0.005)
  assert macs["backbone"] < macs["model"] < 1.01 * macs["backbone"]  # heads are small


def test_collective_bytes_parses_shapes_and_async_pairs():
  hlo = "\n".join([
      "  %ag = u8[4,8,40,40,3]{4,3,2,1,0} all-gather(u8[2,8,40,40,3]{4,3,2,1,0} %p), dims={0}",
      "  %ars = (f32[10]{0}, f32[3,3]{1,0}) all-reduce-start(f32[10]{0} %a, f32[3,3]{1,0} %b)",
      "  %ard = (f32[10]{0}, f32[3,3]{1,0}) all-reduce-done((f32[10]{0}, f32[3,3]{1,0}) %ars)",
      "  %add = f32[10]{0} add(f32[10]{0} %x, f32[10]{0} %y)",
  ])
  summary = jax_step.collective_bytes(hlo)
  assert summary["all-gather"] == {"count": 1, "bytes": 4 * 8 * 40 * 40 * 3}
  assert summary["all-reduce"] == {"count": 1, "bytes": 4 * (10 + 9)}
  assert summary["all-to-all"] == {"count": 0, "bytes": 0}


def test_peak_flops_table():
  assert jax_step.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert jax_step.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  assert jax_step.peak_flops("cpu", "bfloat16") is None
  assert jax_step.peak_flops("TPU v5 lite", "bfloat16") is None


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
  config = _tiny_config(backbone)
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
  spec = _reference_spec(_tiny_config())
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
  step = torch_reference.build_train_step(_reference_spec(_tiny_config()), batch_size=2)
  replies = io.StringIO()
  count = torch_reference.serve_steps(step, warmup=1, commands=io.StringIO(
      "step\nstep\nstop\nstep\n"), replies=replies)
  lines = replies.getvalue().splitlines()
  assert count == 2 and lines[0] == "ready" and len(lines) == 3
  assert all(float(line) > 0 for line in lines[1:])
  with pytest.raises(ValueError, match="unknown command"):
    torch_reference.serve_steps(step, warmup=0, commands=io.StringIO("go\n"),
                                replies=io.StringIO())


def test_torch_step_server_process(tmp_path):
  """The --serve command line as benchmark.py --interleave drives it."""
  request = dict(benchmarks.torch_reference_spec(_tiny_config()), batch_size=2,
                 dtype="float32", warmup=1)
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(request))
  completed = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "torch_reference.py"),
       f"--spec={spec_path}", "--serve"], input="step\nstep\nstep\n", capture_output=True,
      text=True, timeout=600, check=True)
  lines = completed.stdout.split()
  assert lines[0] == "ready" and len(lines) == 4 and all(float(t) > 0 for t in lines[1:])


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
  import importlib.util  # pylint: disable=g-import-not-at-top
  module_spec = importlib.util.spec_from_file_location(
      "benchmark_script", os.path.join(REPO_ROOT, "scripts", "benchmark.py"))
  script = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(script)
  request = dict(benchmarks.torch_reference_spec(_tiny_config()), batch_size=0,
                 dtype="float32", warmup=0)
  with pytest.raises(RuntimeError, match="exited"):
    script.TorchStepServer(request, timeout_s=300)
  assert "batch_size" in capfd.readouterr().err  # the server's own message reaches stderr
