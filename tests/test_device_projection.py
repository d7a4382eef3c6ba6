"""benchmarks/device_peaks.py and benchmarks/device_projection.py: a trace on another chip."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import device_peaks, device_projection  # pylint: disable=g-import-not-at-top

H100 = "NVIDIA H100 80GB HBM3"  # the SXM part's device_kind
# Published peaks, written out here rather than read from the module under test.
H200_BANDWIDTH, H100_BANDWIDTH, H100_PCIE_BANDWIDTH = 4.8e12, 3.35e12, 2.0e12
H100_NVL_BANDWIDTH = 3.9e12
HOPPER_BF16, H100_PCIE_BF16, H100_NVL_BF16 = 989.4e12, 756.0e12, 835.0e12


def _summary(**overrides):
  """A trace summary as profile_step.py writes it (the fields the projection reads)."""
  summary = {"device_kind": "NVIDIA H200", "dtype": "bfloat16", "batch_size": 32,
             "backbone": "r3d50", "chained_step_time_s": 0.010,
             "by_phase_ms": {"forward": {"convolution": 2.0, "reduction": 3.0, "matmul": 1.0},
                             "backward": {"elementwise": 2.0, "other": 0.5},
                             "no metadata": {"matmul": 0.25}}}
  summary.update(overrides)
  return summary


def test_peaks_match_the_most_specific_name():
  assert device_peaks.memory_bandwidth(H100) == H100_BANDWIDTH
  assert device_peaks.memory_bandwidth("NVIDIA H100 PCIe") == H100_PCIE_BANDWIDTH
  assert device_peaks.peak_flops("NVIDIA H100 PCIe", "bfloat16") == H100_PCIE_BF16
  assert device_peaks.memory_bandwidth("NVIDIA H200") == H200_BANDWIDTH
  assert device_peaks.memory_bandwidth("NVIDIA A100-SXM4-40GB") is None
  assert device_peaks.memory_bandwidth("cpu") is None


def test_memory_bound_time_scales_by_bandwidth_compute_bound_by_flops():
  model_flops = 2.0e12
  result = device_projection.project(_summary(), H100, model_flops)
  slower = H200_BANDWIDTH / H100_BANDWIDTH  # same bf16 peak: only bandwidth differs
  memory_ms, compute_ms, matmul_ms = 3.0 + 2.0, 2.0, 1.0 + 0.25 + 0.5  # 'other' joins matmuls
  low_ops = compute_ms + memory_ms * slower + matmul_ms
  high_ops = compute_ms + memory_ms * slower + matmul_ms * slower
  measured_ops = compute_ms + memory_ms + matmul_ms
  assert result["low_step_ms"] == pytest.approx(10.0 + low_ops - measured_ops)
  assert result["high_step_ms"] == pytest.approx(10.0 + high_ops - measured_ops)
  assert result["by_category_ms"]["convolution"] == pytest.approx(
      {"measured_ms": 2.0, "low_ms": 2.0, "high_ms": 2.0})
  assert result["by_category_ms"]["matmul"]["high_ms"] == pytest.approx(1.25 * slower)
  assert result["measured_mfu"] == pytest.approx(model_flops / 0.010 / HOPPER_BF16)
  assert result["low_mfu"] == pytest.approx(
      model_flops / (result["high_step_ms"] / 1e3) / HOPPER_BF16)
  assert result["high_mfu"] == pytest.approx(
      model_flops / (result["low_step_ms"] / 1e3) / HOPPER_BF16)
  assert result["low_mfu"] < result["high_mfu"] < result["measured_mfu"]


def test_a_slower_compute_peak_slows_the_convolutions_and_bounds_the_matmuls():
  result = device_projection.project(_summary(device_kind=H100), "NVIDIA H100 PCIe")
  flops_ratio = HOPPER_BF16 / H100_PCIE_BF16
  bandwidth_ratio = H100_BANDWIDTH / H100_PCIE_BANDWIDTH
  rows = result["by_category_ms"]
  assert rows["convolution"]["low_ms"] == pytest.approx(2.0 * flops_ratio)
  assert rows["reduction"]["high_ms"] == pytest.approx(3.0 * bandwidth_ratio)
  assert rows["matmul"]["low_ms"] == pytest.approx(1.25 * flops_ratio)
  assert rows["matmul"]["high_ms"] == pytest.approx(1.25 * max(flops_ratio, bandwidth_ratio))
  assert "measured_mfu" not in result  # no model FLOPs given


def test_matmuls_never_run_faster_than_the_compute_peak_allows():
  # The NVL part has more bandwidth and a lower peak than the SXM part.
  result = device_projection.project(_summary(device_kind=H100), "NVIDIA H100 NVL")
  flops_ratio = HOPPER_BF16 / H100_NVL_BF16
  bandwidth_ratio = H100_BANDWIDTH / H100_NVL_BANDWIDTH
  assert bandwidth_ratio < 1 < flops_ratio
  rows = result["by_category_ms"]
  assert rows["elementwise"]["low_ms"] == pytest.approx(2.0 * bandwidth_ratio)
  assert rows["matmul"]["low_ms"] == pytest.approx(1.25 * flops_ratio)
  assert rows["matmul"]["high_ms"] == pytest.approx(1.25 * flops_ratio)


def test_projecting_onto_the_traced_device_changes_nothing():
  result = device_projection.project(_summary(), "NVIDIA H200", 1.0e12)
  assert result["low_step_ms"] == pytest.approx(10.0)
  assert result["high_step_ms"] == pytest.approx(10.0)
  assert result["low_mfu"] == pytest.approx(result["measured_mfu"])


def test_a_summary_without_chained_steps_projects_its_median_step():
  summary = _summary(chained_step_time_s=None, step_time_s=0.012)
  result = device_projection.project(summary, "NVIDIA H200", 1.0e12)
  assert result["step_kind"] == "median"
  assert result["measured_step_ms"] == pytest.approx(12.0)
  assert result["high_step_ms"] == pytest.approx(12.0)


def test_unknown_devices_and_categories_are_refused():
  with pytest.raises(ValueError, match="TPU v5 lite.*known"):
    device_projection.project(_summary(), "TPU v5 lite")
  with pytest.raises(ValueError, match="A100"):
    device_projection.project(_summary(), "NVIDIA A100-SXM4-80GB")
  with pytest.raises(ValueError, match="'fft' has no projection rule"):
    device_projection.project(_summary(by_phase_ms={"forward": {"fft": 1.0}}), H100)


def test_command_prints_and_writes_the_projection(tmp_path, capsys):
  summary_path, bench_path = tmp_path / "summary.json", tmp_path / "bench.json"
  out_path = tmp_path / "projection.json"
  summary_path.write_text(json.dumps(_summary()))
  bench_path.write_text(json.dumps({"batch_size": 32, "model_flops_per_step": 2.0e12}))
  assert device_projection.main([str(summary_path), "--to=H100",
                                 f"--benchmark_json={bench_path}",
                                 f"--json={out_path}"]) == 0
  printed = capsys.readouterr().out
  written = json.loads(out_path.read_text())
  assert written["to_device"] == "H100" and "MFU: measured" in printed
  assert f"{written['high_step_ms']:.2f}" in printed
  bench_path.write_text(json.dumps({"batch_size": 64, "model_flops_per_step": 4.0e12}))
  with pytest.raises(SystemExit, match="batch 64"):
    device_projection.main([str(summary_path), "--to=H100",
                            f"--benchmark_json={bench_path}"])
