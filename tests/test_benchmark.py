"""The benchmark suite (issue #6): the script's JSON, FLOP/MAC counting, collectives.

Needs no PyTorch: the PyTorch reference's tests are in test_torch_reference.py, which is
skipped as a whole where torch is not installed (as in CI).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import ab_rounds, augment_variants, jax_step, state_dispatch
from configs import pretrain
from tcvm_jax import augment, host_memory, train_step
from train_test_utils import (FAST_COMPILE_XLA_FLAGS, TINY_BENCHMARK_OVERRIDES,
                              tiny_benchmark_config)

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
  assert results["mfu"] is None and results["chained_mfu"] is None
  assert results["xla_mfu"] is None and results["flops_per_step"] > 0
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
  macs = jax_step.forward_macs_per_video(tiny_benchmark_config())["model"]
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
  kinds = entry["step_collectives"]
  assert "all-reduce" in kinds  # the gradient's
  assert sum(v["bytes"] for v in kinds.values()) == entry["step_collective_bytes_per_device"]
  # Nothing is shuffled between devices but the montage's clips: no permutes (at larger
  # frames the CPU stem's weight-gradient chunks once made them; test_backbones.py).
  assert "collective-permute" not in kinds, kinds


def test_step_without_montage_is_the_step_after_the_montage():
  config = tiny_benchmark_config()
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
  # The steps carry the state flat (config.state_layout); the same vectors in both.
  assert jax.tree.structure(full.state) == jax.tree.structure(model_only.state)
  assert full.state["params"]["float32"].ndim == 1
  for a, b in zip(jax.tree.leaves(full.state["params"]),
                  jax.tree.leaves(model_only.state["params"])):
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

  # Per-backend versions of one op (lax.platform_dependent, a cond): one branch runs, and
  # the cheapest is the computation's own arithmetic (the other form does extra work,
  # like the block stem's zero taps), in either order of the branches.
  def per_backend(a, b, cheap_on_cpu=True):
    small = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
    twice = lambda a, b: small(a, b) + small(a, b)
    cpu, default = (small, twice) if cheap_on_cpu else (twice, small)
    return jax.lax.platform_dependent(a, b, cpu=cpu, default=default)

  for cheap_on_cpu in (True, False):
    jaxpr = jax.make_jaxpr(functools.partial(per_backend, cheap_on_cpu=cheap_on_cpu))(a, b)
    assert jax_step.count_macs(jaxpr.jaxpr) == 4 * 3 * 5 * 7


def test_r3d50_forward_macs_match_the_issue():
  # Issue #6: "forward is 44.0 GMACs per pseudo-video" (R3D50, 32x112x112).
  # The model's arithmetic whatever layout the stem computes in: the block layout's zero
  # taps (its default on CUDA) are not model FLOPs.
  for stem_layout in ("auto", "blocks", "pixels"):
    config = pretrain.get_config("")
    config.model.stem_layout = stem_layout
    macs = jax_step.forward_macs_per_video(config)
    assert macs["backbone"] == pytest.approx(44.0e9, rel=0.005), stem_layout
    assert macs["backbone"] < macs["model"] < 1.01 * macs["backbone"]  # heads are small
    assert config.model.stem_layout == stem_layout  # the caller's config is left alone


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


def test_mfu_counts_the_models_flops_and_xlas_count_apart():
  # The H200 run of 2026-11-27 (benchmarks/results/2026-11-27_h200_b/tc.json): R3D50 at
  # B = 32 is 6 x 44.14 GMACs x 32 = 8.475 TFLOP per step; 39.26 ms waited, 39.50 ms
  # chained; XLA's cost analysis counted 1.056 TFLOP (no cuDNN or cuBLAS calls).
  model_flops = 6 * 44.142297088e9 * 32
  figures = jax_step.utilisation(model_flops, 1.05585e12, 0.0392644, 0.0394974, 989.4e12, 1)
  assert figures["mfu"] == pytest.approx(model_flops / 0.0392644 / 989.4e12)
  assert figures["mfu"] == pytest.approx(0.2182, abs=1e-4)
  assert figures["chained_mfu"] == pytest.approx(0.2169, abs=1e-4)
  assert figures["xla_mfu"] == pytest.approx(0.0272, abs=1e-4)
  assert figures["flops_per_s"] == pytest.approx(1.05585e12 / 0.0392644)
  # Two devices: twice the capacity, half the utilisation of the same step time.
  assert jax_step.utilisation(model_flops, None, 0.0392644, 0.0394974, 989.4e12, 2)[
      "mfu"] == pytest.approx(figures["mfu"] / 2)
  unknown_peak = jax_step.utilisation(model_flops, 1.0e12, 0.04, 0.04, None, 1)
  assert unknown_peak["mfu"] is None and unknown_peak["xla_mfu"] is None
  assert unknown_peak["flops_per_s"] == pytest.approx(2.5e13)


def test_peak_flops_table():
  assert jax_step.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert jax_step.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  assert jax_step.peak_flops("cpu", "bfloat16") is None
  assert jax_step.peak_flops("TPU v5 lite", "bfloat16") is None


def test_augment_variants_time_every_variant_and_write_the_winner(capsys, tmp_path):
  json_path, flags_path = tmp_path / "augment.json", tmp_path / "winner.txt"
  assert augment_variants.main(["--config=configs/pretrain.py:demo", "--batch_size=1",
                                "--steps=1", "--rounds=2", f"--json={json_path}",
                                f"--winner_flags={flags_path}"]) == 0
  out = capsys.readouterr().out
  result = json.loads(json_path.read_text())
  # Off CUDA the Pallas variants are the XLA form, so they are not timed.
  # Off CUDA the Pallas variant runs the XLA form, so it is not timed; those that name the
  # CPU's 'auto' choices one by one compile to the default's program.
  assert set(result["times_s"]) | set(result["skipped"]) == set(augment_variants.VARIANTS)
  assert {"jitter_pallas", "planes_float32", "blur_taps", "jitter_xla"} <= set(
      result["skipped"])
  assert {"default", "blur_matmul"} <= set(result["times_s"])
  for name in result["times_s"]:
    assert re.search(rf"^{name} +\d+\.\d+ ms  x\d\.\d+  max ", out, re.MULTILINE), name
  assert result["max_abs_difference_to_default"]["blur_matmul"] < 1e-3
  assert "4 clips of 4 x 64^2 -> 56^2" in out and result["failed"] == {}
  winner = result["winner"]
  assert flags_path.read_text() == " ".join(result["winner_flags"])
  assert winner is None or (winner in result["times_s"] and result["times_s"][winner]
                            <= 0.95 * result["times_s"]["default"])


def test_augment_variants_report_a_variant_that_fails_and_time_the_rest(capsys, tmp_path,
                                                                         monkeypatch):
  # A kernel that does not compile on the GPU must not cost the session its other figures.
  original = augment.augment_clips

  def failing_matmul_blur(params, clips, dtype, compute):
    if compute.blur_rows == "matmul":
      raise RuntimeError("no kernel for this blur")
    return original(params, clips, dtype, compute)

  monkeypatch.setattr(augment, "augment_clips", failing_matmul_blur)
  json_path = tmp_path / "augment.json"
  assert augment_variants.main(["--config=configs/pretrain.py:demo", "--batch_size=1",
                                "--steps=1", "--rounds=1", f"--json={json_path}",
                                "--without=planes_float32,none"]) == 0
  result = json.loads(json_path.read_text())
  assert {"planes_float32", "none"} <= set(result["skipped"])
  assert set(result["failed"]) == {"blur_matmul"}
  assert "no kernel for this blur" in result["failed"]["blur_matmul"]
  assert "blur_matmul: FAILED, RuntimeError: no kernel" in capsys.readouterr().out
  assert set(result["times_s"]) == {"default"}
  for bad in ("default", "planes_float64"):  # the baseline stays; names are checked
    with pytest.raises(SystemExit):
      augment_variants.main([f"--without={bad}"])


def test_augment_variants_set_existing_fields_and_pick_a_clear_winner():
  # benchmarks/augment_variants.py, the session's augment phase: each variant's overrides
  # are allowed values of existing config.augment fields, and its winner goes to the
  # benchmark as flags only when it beats the default by the margin.
  config = pretrain.get_config()
  assert augment_variants.VARIANTS[augment_variants.DEFAULT] == {}
  for name, overrides in augment_variants.VARIANTS.items():
    assert set(overrides) <= set(augment.COMPUTE_CHOICES), name  # how, never what
    compute = augment.compute_options(config.augment, **overrides)
    changed = ab_rounds.apply_overrides(
        config, {f"augment.{field}": value for field, value in overrides.items()})
    augment.validate_augment_config(changed.augment)
    for field, value in overrides.items():
      assert changed.augment[field] == value == getattr(compute, field)
  times = {"default": 1.0, "blur_matmul": 0.97, "jitter_pallas": 0.9}
  assert augment_variants.winner(times, 0.05) == "jitter_pallas"
  assert augment_variants.winner(times, 0.12) is None
  assert augment_variants.winner({"default": 1.0, "blur_matmul": 1.2}, 0.05) is None

def test_state_dispatch_compares_the_two_layouts_of_the_same_state(capsys):
  # benchmarks/state_dispatch.py: the same leaves in both layouts, Variables in one only;
  # the train step's state is the dict layout.
  config = pretrain.get_config("demo")
  states = state_dispatch.tiny_states(config)
  leaves = {name: jax.tree.leaves(state) for name, state in states.items()}
  assert len(leaves["nnx.State"]) == len(leaves["dict"]) > 100
  is_variable = lambda x: isinstance(x, nnx.Variable)
  assert any(map(is_variable, jax.tree.leaves(states["nnx.State"], is_leaf=is_variable)))
  assert not any(map(is_variable, jax.tree.leaves(states["dict"], is_leaf=is_variable)))
  _, params, batch_stats = train_step.abstract_model(config)
  assert (jax.tree.structure(params), jax.tree.structure(batch_stats)) == (
      jax.tree.structure(states["dict"]["params"]),
      jax.tree.structure(states["dict"]["batch_stats"]))
  assert state_dispatch.main(["--config=configs/pretrain.py:demo", "--calls=3",
                              "--rounds=2"]) == 0
  out = capsys.readouterr().out
  assert (f"{len(leaves['dict'])} leaves in the state, 6 flat; nnx.State / dict = "
          in out)  # flat: params, statistics, momentum, the step, the key, optax's count
  assert re.search(r"^flat +\d+\.\d+ ms per call", out, re.MULTILINE)
