"""The PyTorch reference (benchmarks/torch_reference.py, issue #6): the same network and the
same loss as the JAX model, its timed step, and the server benchmark.py --interleave
drives. Skipped as a whole where torch is not installed (it is optional; CI has none).
"""

from __future__ import annotations

import dataclasses
import itertools
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


# --- The montage + augmentation of the reference's step is the JAX one -------------------

from benchmarks import torch_montage  # noqa: E402  pylint: disable=wrong-import-position
from tcvm_jax import augment  # noqa: E402  pylint: disable=wrong-import-position


def _as_jax_params(params, out_size: int) -> augment.AugmentParams:
  def jax_array(value):
    value = value.numpy()
    return jnp.asarray(value.astype(np.int32) if value.dtype == np.int64 else value)
  return augment.AugmentParams(
      **{field.name: jax_array(getattr(params, field.name))
         for field in dataclasses.fields(torch_montage.ClipParams)}, out_size=out_size)


def test_torch_augmentation_equals_jax_apply_augment():
  """Given the same parameters, every clip's torch augmentation is JAX's apply_augment
  (crop, resize with antialias, flip, all 24 jitter orders on and off, grayscale, blur)."""
  num, length, height, width, out_size = 48, 3, 40, 52, 28
  settings = torch_montage.AugmentSettings()
  torch.manual_seed(3)
  params = torch_montage.sample_params(num, (height, width), out_size, settings,
                                       torch.device("cpu"))
  every = torch.arange(num)
  params.jitter_order = torch.stack([torch.tensor(order) for order in
                                     itertools.permutations(range(4))])[every % 24]
  params.jitter = every < 24 + 12  # each order on, half of them also off
  params.grayscale = every % 5 == 0
  params.blur = every % 2 == 0
  params.flip = every % 3 == 0
  clips = np.random.default_rng(4).integers(0, 256, (num, length, height, width, 3), np.uint8)
  torch_out = torch_montage.augment_clips(torch.from_numpy(clips), params, out_size, settings)
  expected = jax.vmap(augment.apply_augment)(_as_jax_params(params, out_size),
                                             jnp.asarray(clips))
  assert torch_out.shape == (num, length, out_size, out_size, 3)
  np.testing.assert_allclose(torch_out.numpy(), np.asarray(expected), atol=2e-4)


def test_torch_reference_leaves_out_exactly_the_jax_compute_switches():
  # Its list is a literal (the reference stays JAX-free): the switches that say how JAX's
  # augmentation computes, no more (those are what it computes), no fewer.
  assert set(torch_reference.COMPUTE_FIELDS) == set(augment.COMPUTE_CHOICES)
  config = pretrain.get_config()
  for name, choices in augment.COMPUTE_CHOICES.items():
    config.augment[name] = choices[-1]
  settings = _reference_spec(config).augment_settings
  assert not set(augment.COMPUTE_CHOICES) & {field.name for field in
                                            dataclasses.fields(settings)}


def test_torch_crop_boxes_equal_jax_crop_boxes():
  """torchvision's RandomResizedCrop rules, vectorised in both frameworks: the same uniform
  draws give the same boxes, including the fallback when no candidate fits."""
  uniforms = np.random.default_rng(5).random((200, 22)).astype(np.float32)
  for in_hw, scale, ratio in (((64, 64), (0.2, 1.0), (3 / 4, 4 / 3)),
                              ((40, 90), (0.08, 1.0), (3 / 4, 4 / 3)),
                              ((40, 90), (0.95, 1.0), (3.0, 4.0))):  # rarely fits
    boxes = torch_montage.crop_boxes(torch.from_numpy(uniforms), in_hw, scale, ratio).numpy()
    expected = jax.vmap(lambda u: augment.crop_box_from_uniforms(u, in_hw, scale, ratio))(
        jnp.asarray(uniforms))
    np.testing.assert_array_equal(boxes, np.asarray(expected))
    assert (boxes[:, 0] + boxes[:, 2] <= in_hw[0]).all()
    assert (boxes[:, 1] + boxes[:, 3] <= in_hw[1]).all()


def test_torch_montage_moves_every_clip_once_and_labels_its_source():
  """Augmentation made an identity (whole-frame crop at the input size, no colour ops,
  mean 0 / std 1): each slot holds clip k of its labelled source, each (video, clip) is
  used once, and a pseudo-video's clips come from different videos."""
  num_videos, num_clips, length, size = 6, 3, 2, 8
  settings = torch_montage.AugmentSettings(
      crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
      grayscale_prob=0.0, blur_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  frames = np.arange(num_videos * num_clips * length, dtype=np.uint8)  # video-major ids
  videos = np.broadcast_to(frames.reshape(num_videos, num_clips * length, 1, 1, 1),
                           (num_videos, num_clips * length, size, size, 3))
  torch.manual_seed(6)
  pseudo, labels = torch_montage.video_montage(
      torch.from_numpy(np.ascontiguousarray(videos)), num_clips=num_clips, out_size=size,
      settings=settings)
  assert pseudo.shape == (num_videos, num_clips * length, size, size, 3)
  labels = labels.numpy().reshape(num_videos, num_clips)
  frame_ids = np.rint(pseudo.numpy()[:, :, 0, 0, 0] * 255).astype(int)  # (N, T)
  np.testing.assert_allclose(pseudo.numpy(), np.broadcast_to(
      frame_ids[:, :, None, None, None] / 255, pseudo.shape), atol=1e-6)  # whole frames
  for n in range(num_videos):
    assert len(set(labels[n])) == num_clips
    for k in range(num_clips):
      first = (labels[n, k] * num_clips + k) * length
      np.testing.assert_array_equal(frame_ids[n, k * length:(k + 1) * length],
                                    np.arange(first, first + length))
  assert sorted(map(tuple, np.stack([labels, np.broadcast_to(np.arange(num_clips),
                                                             labels.shape)], -1)
                    .reshape(-1, 2))) == [(v, k) for v in range(num_videos)
                                          for k in range(num_clips)]


def test_torch_montage_refuses_what_it_does_not_implement():
  config = tiny_benchmark_config()
  config.montage.variant = "A-C-S"
  with pytest.raises(ValueError, match="C-A-S"):
    _reference_spec(config)
  config = tiny_benchmark_config()
  config.augment.unknown_option = 1.0
  with pytest.raises(TypeError, match="unknown_option"):
    _reference_spec(config)


@pytest.mark.parametrize("backbone", ["r3d_tiny", "tsm_tiny"])
def test_torch_benchmark_step_runs(backbone):
  spec = _reference_spec(tiny_benchmark_config(backbone))
  figures = torch_reference.benchmark_train_step(spec, batch_size=2, steps=3, warmup=0)
  assert figures["step_time_s"] == pytest.approx(float(np.median(figures["step_times_s"])))
  assert figures["videos_per_s"] == pytest.approx(2 / figures["step_time_s"])
  assert figures["includes_montage"] is True and figures["compiled"] is False
  assert math.isfinite(figures["final_loss"])
  # The step without the montage and the montage alone are timed too.
  assert figures["model_step_time_s"] == pytest.approx(
      float(np.median(figures["model_step_times_s"])))
  assert 0 < figures["montage_time_s"] and figures["montage_share"] == pytest.approx(
      figures["montage_time_s"] / figures["step_time_s"])
  with pytest.raises(ValueError, match="dtype"):
    torch_reference.benchmark_train_step(spec, batch_size=2, dtype="float16")


def test_torch_step_server_times_one_step_per_request():
  """serve_steps: "ready" after the warm-up, one positive time per "step", stops on "stop";
  an unknown request is an error, not a silent skip."""
  import io  # pylint: disable=g-import-not-at-top
  step = torch_reference.build_train_step(_reference_spec(tiny_benchmark_config()), batch_size=2)
  replies = io.StringIO()
  count = torch_reference.serve_steps(step, warmup=1, commands=io.StringIO(
      "step\nmodel_step\nstop\nstep\n"), replies=replies)
  lines = replies.getvalue().splitlines()
  assert count == 2 and lines[0] == "ready eager" and len(lines) == 3
  assert all(float(line) > 0 for line in lines[1:])
  with pytest.raises(ValueError, match="unknown command"):
    torch_reference.serve_steps(step, warmup=0, commands=io.StringIO("go\n"),
                                replies=io.StringIO())


def test_torch_step_server_falls_back_to_eager_when_compile_fails(capfd):
  """A torch.compile'd step that fails in the warm-up is replaced by the eager step, and
  the server says so ("ready eager", the error on stderr) instead of dying."""
  import io  # pylint: disable=g-import-not-at-top
  step = torch_reference.build_train_step(_reference_spec(tiny_benchmark_config()),
                                          batch_size=2)

  def broken():
    raise RuntimeError("inductor exploded")

  compiled = dataclasses.replace(step, run=broken, model_run=broken, montage_run=broken)
  replies = io.StringIO()
  count = torch_reference.serve_steps(compiled, warmup=1, commands=io.StringIO(
      "model_step\nstep\n"), replies=replies)
  lines = replies.getvalue().splitlines()
  assert count == 2 and lines[0] == "ready eager" and all(float(t) > 0 for t in lines[1:])
  assert "inductor exploded" in capfd.readouterr().err


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
  assert interleaved["torch_compiled"] is False
  for name in ("jax", "jax_model_only", "torch", "torch_model_only"):
    assert len(interleaved[f"{name}_step_times_s"]) == 4
    assert len(interleaved["first_in_block_step_times_s"][name]) == 2
  assert interleaved["ratio"] == pytest.approx(
      interleaved["torch_step_time_s"] / interleaved["jax_step_time_s"])
  assert interleaved["ratio_model_only"] == pytest.approx(
      interleaved["torch_model_only_step_time_s"]
      / interleaved["jax_model_only_step_time_s"])


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
    times = [server.step(which) for which in ("step", "model_step", "step")]
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
