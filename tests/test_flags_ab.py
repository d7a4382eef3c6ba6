"""benchmarks/flags_ab.py: XLA flag A/B runs of the benchmark."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from benchmarks import ab_rounds, flags_ab
from train_test_utils import FAST_COMPILE_XLA_FLAGS, REPO_ROOT, TINY_BENCHMARK_OVERRIDES


def test_parse_variant():
  assert ab_rounds.parse_variant("base=") == ("base", "")
  assert ab_rounds.parse_variant("nhwc=--xla_gpu_force_conv_nhwc=true") == (
      "nhwc", "--xla_gpu_force_conv_nhwc=true")
  for bad in ("noflags", "=--x=1"):
    with pytest.raises(argparse.ArgumentTypeError):
      ab_rounds.parse_variant(bad)


def test_rounds_alternate_the_order():
  variants = [("a", ""), ("b", "-x"), ("c", "-y")]
  assert [n for n, _ in ab_rounds.round_order(variants, 0)] == ["a", "b", "c"]
  assert [n for n, _ in ab_rounds.round_order(variants, 1)] == ["c", "b", "a"]
  assert [n for n, _ in ab_rounds.round_order(variants, 2)] == ["a", "b", "c"]


def test_summary_medians_and_ratios():
  def run(step, chained):
    return {"step_time_s": step, "chained_step_time_s": chained}
  variants = [("base", ""), ("fast", "-f"), ("broken", "-b")]
  runs = {"base": [run(0.10, 0.09), run(0.14, 0.11), run(0.12, 0.10)],
          "fast": [run(0.06, 0.05), {"error": "exit 1"}, run(0.08, 0.05)],
          "broken": [{"error": "exit 134: unknown flag"}]}
  rows = {row["variant"]: row for row in flags_ab.summarize(variants, runs)}
  assert rows["base"]["step_time_s"] == pytest.approx(0.12)  # median of 3 rounds
  assert rows["base"]["vs_first"] == pytest.approx(1.0)
  assert rows["fast"]["rounds_ok"] == 2 and rows["fast"]["errors"] == ["exit 1"]
  assert rows["fast"]["step_time_s"] == pytest.approx(0.07)
  assert rows["fast"]["vs_first"] == pytest.approx(0.07 / 0.12)
  assert rows["fast"]["chained_vs_first"] == pytest.approx(0.05 / 0.10)
  assert rows["broken"]["rounds_ok"] == 0 and "step_time_s" not in rows["broken"]
  table = flags_ab.format_rows(list(rows.values()))
  assert "broken" in table and "unknown flag" in table


def test_two_variants_end_to_end(tmp_path):
  json_path = tmp_path / "ab.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "flags_ab.py"),
             "--variant=base=", "--variant=one_thread=--xla_cpu_multi_thread_eigen=false",
             "--variant=bogus=--xla_no_such_flag_for_tcvm=1", "--rounds=1",
             f"--json={json_path}", "--", *TINY_BENCHMARK_OVERRIDES,
             "--batch_size=2", "--steps=2", "--warmup=1"]
  completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                             timeout=600)
  assert completed.returncode == 1, completed.stdout + completed.stderr  # 'bogus' failed
  results = json.loads(json_path.read_text())
  rows = {row["variant"]: row for row in results["rows"]}
  for name in ("base", "one_thread"):
    assert rows[name]["rounds_ok"] == 1, rows[name]
    assert rows[name]["step_time_s"] > 0
  assert rows["base"]["vs_first"] == pytest.approx(1.0)
  assert rows["bogus"]["rounds_ok"] == 0 and rows["bogus"]["errors"]
  assert "bogus" in completed.stdout and "failed" in completed.stdout
