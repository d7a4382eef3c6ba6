"""benchmarks/options_ab.py (compiler-option A/B of the step in one process), the
helpers it shares with flags_ab.py (benchmarks/ab_rounds.py), the pick of its winners
(benchmarks/ab_winners.py) and the variants scripts/gpu_session.sh gives it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from benchmarks import ab_rounds, ab_winners
from configs import pretrain
from train_test_utils import (FAST_COMPILE_XLA_FLAGS, REPO_ROOT, TINY_BENCHMARK_OVERRIDES,
                              gpu_session_variants, subprocess_env)


def test_option_values_get_the_types_xla_wants():
  assert ab_rounds.option_value(None) is True  # a bare --xla_flag
  assert ab_rounds.option_value("true") is True and ab_rounds.option_value("False") is False
  assert ab_rounds.option_value("3") == 3 and isinstance(ab_rounds.option_value("3"), int)
  assert ab_rounds.option_value("0.5") == 0.5
  assert ab_rounds.option_value("") == ""  # an empty list (e.g. no command buffers)
  assert ab_rounds.option_value("MODE_GREEDY") == "MODE_GREEDY"


def test_parse_options_splits_xla_options_from_config_overrides():
  assert ab_rounds.parse_options(
      "--xla_gpu_force_conv_nhwc=true --xla_gpu_enable_command_buffer= --xla_x=2 --xla_y "
      "--config.model.dtype=bfloat16") == (
          {"xla_gpu_force_conv_nhwc": True, "xla_gpu_enable_command_buffer": "",
           "xla_x": 2, "xla_y": True},
          {"model.dtype": "bfloat16"})
  for bad in ("xla_a=1", "--jax_a=1", "--xla_a=1 --xla_a=2", "--config.a=1 --config.a=2",
              "--config.a"):
    with pytest.raises(ValueError):
      ab_rounds.parse_options(bad)


def test_parse_variants_adds_the_default_and_rejects_clashes():
  variants = ab_rounds.option_variants(["nhwc=--xla_gpu_force_conv_nhwc=true",
                                        "f32=--config.model.dtype=float32"])
  assert variants == [("default", "", {}, {}),
                      ("nhwc", "--xla_gpu_force_conv_nhwc=true",
                       {"xla_gpu_force_conv_nhwc": True}, {}),
                      ("f32", "--config.model.dtype=float32", {},
                       {"model.dtype": "float32"})]
  for specs in (["a=--xla_x=1", "a=--xla_y=1"], ["default=--xla_x=1"],
                ["control=--xla_x=1"], ["empty="], ["a=--jax_x=1"]):
    with pytest.raises(ValueError):
      ab_rounds.option_variants(specs)
  with pytest.raises(argparse.ArgumentTypeError):
    ab_rounds.option_variants(["no_equals_sign"])


def test_config_overrides_are_typed_by_the_field_and_copy_the_config():
  config = ml_collections.ConfigDict({"batch_size": 16, "model": {
      "dtype": "float32", "zero_init": True, "momentum": 0.9, "axis": None}})
  changed = ab_rounds.apply_overrides(config, {"batch_size": "8", "model.dtype": "bfloat16",
                                               "model.zero_init": "False",
                                               "model.momentum": "0.5"})
  assert (changed.batch_size, changed.model.dtype) == (8, "bfloat16")
  assert changed.model.zero_init is False and changed.model.momentum == 0.5
  assert (config.batch_size, config.model.dtype, config.model.zero_init) == (
      16, "float32", True)  # the original is untouched
  for field, text in (("model.nope", "1"), ("nope.x", "1"), ("batch_size.x", "1"),
                      ("batch_size", "eight"), ("model.zero_init", "yes"),
                      ("model.axis", "data")):
    with pytest.raises(ValueError, match=field.split(".")[-1] if field != "nope.x" else "nope"):
      ab_rounds.apply_overrides(config, {field: text})


def test_summary_ratios_are_taken_within_each_round():
  def times(step, chained):
    return {"step_time_s": step, "chained_step_time_s": chained}
  # The machine slows down 2x in round 2: per-round ratios stay 0.5, as they should.
  rounds = [{"default": times(0.10, 0.08), "fast": times(0.05, 0.04)},
            {"default": times(0.20, 0.16), "fast": times(0.10, 0.08)},
            {"default": times(0.12, 0.10), "fast": times(0.09, 0.05)}]
  summary = ab_rounds.summarize_rounds(["default", "fast"], rounds)
  assert summary["default"]["ratio_median"] == pytest.approx(1.0)
  assert summary["fast"]["step_time_s"] == pytest.approx(0.09)  # median over rounds
  assert summary["fast"]["chained_step_time_s"] == pytest.approx(0.05)
  assert summary["fast"]["ratio_median"] == pytest.approx(0.5)
  assert summary["fast"]["ratio_min"] == pytest.approx(0.5)
  assert summary["fast"]["ratio_max"] == pytest.approx(0.75)
  assert summary["fast"]["chained_ratio_median"] == pytest.approx(0.5)


def _run(tmp_path, *args):
  env = subprocess_env(1)
  env["XLA_FLAGS"] += " " + FAST_COMPILE_XLA_FLAGS
  command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "options_ab.py"),
             *TINY_BENCHMARK_OVERRIDES, "--batch_size=2", "--steps_per_round=1",
             "--warmup=1", *args]
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=600)


def test_end_to_end_on_cpu(tmp_path):
  json_path = tmp_path / "ab.json"
  # Turning YNNPACK fusions off changes XLA:CPU's compiled program, and so does cutting
  # videos into one clip instead of two.
  completed = _run(tmp_path, "--variant=no_ynn=--xla_cpu_experimental_ynn_fusion_type=",
                   "--variant=one_clip=--config.montage.num_clips=1", "--rounds=2",
                   f"--json={json_path}")
  assert completed.returncode == 0, completed.stdout + completed.stderr
  results = json.loads(json_path.read_text())
  names = ["default", "no_ynn", "one_clip", "control"]
  assert [v["name"] for v in results["variants"]] == names
  assert results["variants"][1]["options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert results["variants"][2]["config_overrides"] == {"montage.num_clips": "1"}
  # Both reached the compiler: each variant's program differs from the default's; the
  # control is the default compiled again.
  assert results["hlo_identical_to_default"] == {"default": True, "no_ynn": False,
                                                 "one_clip": False, "control": True}
  assert len(results["rounds"]) == 2
  assert results["rounds_done"] == results["rounds_planned"] == 2
  assert not os.path.exists(f"{json_path}.tmp")
  for round_times in results["rounds"]:
    assert all(t > 0 for name in names for t in round_times[name].values())
  assert results["summary"]["default"]["ratio_median"] == pytest.approx(1.0)
  assert results["summary"]["no_ynn"]["ratio_median"] > 0
  assert "no_ynn" in completed.stdout and "differs" in completed.stdout


def test_an_unknown_option_is_named_and_left_out_and_the_others_still_run(tmp_path):
  json_path = tmp_path / "ab.json"
  completed = _run(tmp_path, "--variant=bogus=--xla_no_such_option_for_tcvm=1",
                   "--variant=one_clip=--config.montage.num_clips=1", "--rounds=1",
                   "--nocontrol", f"--json={json_path}")
  assert completed.returncode == 1
  assert "xla_no_such_option_for_tcvm" in completed.stderr
  assert "did not compile" in completed.stderr
  results = json.loads(json_path.read_text())
  assert list(results["failed"]) == ["bogus"]
  assert [v["name"] for v in results["variants"]] == ["default", "one_clip"]
  assert set(results["summary"]) == {"default", "one_clip"}


def _ab_result(rows):
  """An options_ab.py JSON result: rows of (name, flags, waited ratio, chained ratio)."""
  return {"variants": [{"name": name, "flags": flags} for name, flags, _, _ in rows],
          "summary": {name: {"ratio_median": waited, "chained_ratio_median": chained}
                      for name, _, waited, chained in rows}}


def test_winners_beat_the_margin_and_the_control_and_do_not_clash():
  rows = [("default", "", 1.0, 1.0),
          ("control", "(the default, compiled again)", 1.01, 0.97),  # noise: 3 %
          ("nhwc", "--xla_gpu_force_conv_nhwc=true", 0.97, 0.95),
          ("small_gain", "--xla_gpu_x=1", 0.97, 0.975),     # within the control's noise
          ("waits_longer", "--xla_gpu_y=1", 1.02, 0.90),    # chained faster, waited slower
          ("nhwc_off", "--xla_gpu_force_conv_nhwc=false", 0.9, 0.93),  # clashes, faster
          ("one_reduction", "--config.model.bn_statistics=one_reduction", 0.96, 0.96)]
  names, xla, config = ab_winners.pick_winners(_ab_result(rows), min_gain=0.02)
  assert names == ["nhwc_off", "one_reduction"]  # fastest first; 'nhwc' clashes with it
  assert xla == ["--xla_gpu_force_conv_nhwc=false"]
  assert config == ["--config.model.bn_statistics=one_reduction"]
  # Without a control the margin is min_gain: 'small_gain' (2.5 %) and 'nhwc' count then,
  # still behind the faster 'nhwc_off' for the same flag.
  names, _, _ = ab_winners.pick_winners(_ab_result(rows[:1] + rows[2:]), min_gain=0.02)
  assert names == ["nhwc_off", "one_reduction", "small_gain"]
  assert ab_winners.pick_winners(_ab_result(rows[:2]), min_gain=0.02) == ([], [], [])


def test_a_config_variant_with_the_default_program_cannot_win():
  # A CUDA-only switch timed on a CPU compiles to the default's program: its "gain" is
  # noise. An XLA flag with the same HLO may still change code generation.
  rows = [("default", "", 1.0, 1.0),
          ("pool_select", "--config.model.stem_pool_gradient=select", 0.94, 0.93),
          ("no_command_buffer", "--xla_gpu_enable_command_buffer=", 0.95, 0.95),
          ("stem_pixels", "--config.model.stem_layout=pixels", 0.9, 0.9)]
  result = _ab_result(rows)
  result["hlo_identical_to_default"] = {"pool_select": True, "no_command_buffer": True,
                                        "stem_pixels": False}
  names, _, _ = ab_winners.pick_winners(result, min_gain=0.02)
  assert names == ["stem_pixels", "no_command_buffer"]
  del result["hlo_identical_to_default"]  # older results: no such record, no exclusion
  names, _, _ = ab_winners.pick_winners(result, min_gain=0.02)
  assert names == ["stem_pixels", "pool_select", "no_command_buffer"]


def test_winners_script_output_is_shell_assignments(tmp_path):
  result = tmp_path / "options_ab.json"
  result.write_text(json.dumps(_ab_result([
      ("default", "", 1.0, 1.0),
      ("both", "--xla_gpu_enable_command_buffer= --config.model.bn_gradient=closed_form",
       0.9, 0.9)])))
  completed = subprocess.run(
      ["bash", "-c", f'eval "$({sys.executable} benchmarks/ab_winners.py {result})"; '
       'echo "[$WINNING_XLA_FLAGS] [$WINNING_CONFIG_FLAGS]"'],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
  assert completed.returncode == 0, completed.stderr
  assert completed.stdout.strip() == ("[--xla_gpu_enable_command_buffer=] "
                                      "[--config.model.bn_gradient=closed_form]")
  assert "both" in completed.stderr and "WINS" in completed.stderr


def test_gpu_session_variants_parse_and_set_existing_config_fields():
  # A typo here would only show on the rarely lent GPU machine; catch it on CPU.
  lever_specs = gpu_session_variants("LEVERS")
  tsm_specs = gpu_session_variants("TSM_TRITON_VARIANTS")
  assert len(tsm_specs) == 2
  for specs, preset in ((lever_specs, ""), (tsm_specs, "tsm50")):
    assert all(re.fullmatch(r"\w+=--\S+( --\S+)*", spec) for spec in specs)
    config = pretrain.get_config(preset)
    for _, _, options, overrides in ab_rounds.option_variants(specs):
      assert all(name.startswith("xla_gpu_") for name in options)
      changed = ab_rounds.apply_overrides(config, overrides)
      for field, text in overrides.items():
        node = changed
        for part in field.split("."):
          node = node[part]
        assert str(node) == text
  completed = subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, "scripts",
                                                          "gpu_session.sh")],
                             capture_output=True, text=True, timeout=60)
  assert completed.returncode == 0, completed.stderr

