"""Config validation: every bad value fails up front with the field's name and range."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from configs import pretrain, retrieval
from tcvm_jax import config_files
from tcvm_jax.config_validation import ConfigError, validate_config
from train_test_utils import REPO_ROOT, set_field, subprocess_env


def _config(preset: str = "demo"):
  config = pretrain.get_config(preset)
  config.data.name = "random"  # no files needed unless a test is about paths
  return config


@pytest.mark.parametrize("preset", ["", "tsm50", "demo"])
def test_presets_are_valid(preset):
  validate_config(_config(preset), num_devices=1, check_model=False)


@pytest.mark.parametrize("field, value, message", [
    ("model.tc_k", 1.5, r"config\.model\.tc_k=1\.5: must lie in \[0\.0, 1\.0\]"),
    ("model.tc_k", -0.1, r"config\.model\.tc_k=-0\.1: must lie in \[0\.0, 1\.0\]"),
    ("data.num_frames", 30, r"config\.data\.num_frames=30: must be divisible by "
                            r"montage\.num_clips=4"),
    ("montage.num_clips", 1, r"config\.montage\.num_clips=1: must be an integer in \[2, inf\]"),
    ("montage.variant", "C-X", r"config\.montage\.variant='C-X': choose one of .*'C-A-S'"),
    ("model.backbone", "r3d18", r"config\.model\.backbone='r3d18': choose one of .*'r3d50'"),
    ("model.dtype", "float16", r"config\.model\.dtype='float16': choose one of"),
    ("data.name", "kinetics", r"config\.data\.name='kinetics': choose one of"),
    ("loss.temperature", 0.0, r"config\.loss\.temperature=0\.0: must lie in \(0\.0, inf\)"),
    ("loss.positive_reduction", "max", r"config\.loss\.positive_reduction='max'"),
    ("schedule", "linear", r"config\.schedule='linear': choose one of \('step', 'cosine'\)"),
    ("momentum", 1.0, r"config\.momentum=1\.0: must lie in \[0\.0, 1\.0\)"),
    ("batch_size", 0, r"config\.batch_size=0: must be an integer in \[1, inf\]"),
    ("num_train_steps", 0, r"config\.num_train_steps=0: .*or one of \(-1,\)"),
    ("decay_epochs", (100, 50), r"config\.decay_epochs=\(100, 50\): must be increasing"),
    ("augment.crop_scale", (0.5, 0.2), r"config\.augment\.crop_scale=\(0\.5, 0\.2\)"),
    ("augment.hue", 0.7, r"config\.augment\.hue=0\.7: must lie in \[0\.0, 0\.5\]"),
    ("augment.flip_prob", 1.2, r"config\.augment\.flip_prob=1\.2: must lie in \[0\.0, 1\.0\]"),
    ("augment.blur_rows", "dense",
     r"config\.augment\.blur_rows='dense': choose one of \('auto', 'taps', 'matmul'\)"),
    ("augment.plane_dtype", "float16",
     r"config\.augment\.plane_dtype='float16': choose one of \('auto', 'float32', 'bfloat16'\)"),
    ("augment.jitter_kernel", "triton",
     r"config\.augment\.jitter_kernel='triton': choose one of \('auto', 'xla', 'pallas'\)"),
    ("keep_checkpoints", 0, r"config\.keep_checkpoints=0: must be an integer in \[1, inf\]"),
    ("model.tc_hidden_dim", 0, r"config\.model\.tc_hidden_dim=0"),
    ("model.bn_axis_name", 3, r"config\.model\.bn_axis_name=3: must be None or"),
    ("model.bn_gradient", "fast", r"config\.model\.bn_gradient='fast': choose one of .*closed_form"),
    ("model.bn_statistics", "one",
     r"config\.model\.bn_statistics='one': choose one of .*one_reduction"),
    ("model.bn_fold", "all",
     r"config\.model\.bn_fold='all': choose one of .*widening_4x"),
    ("model.tsm_shift", "pallas",
     r"config\.model\.tsm_shift='pallas': choose one of \('auto', 'fused', 'barrier'\)"),
    ("preset", "big", r"config\.preset='big': choose one of"),
    ("eval_retrieval", "k400", r"config\.eval_retrieval='k400': choose one of \('ucf101'"),
])
def test_bad_value_names_the_field_and_range(field, value, message):
  config = _config()
  set_field(config, field, value)
  with pytest.raises(ConfigError, match=message):
    validate_config(config, num_devices=1, check_model=False)


def test_batch_must_split_over_devices_and_processes():
  config = _config()
  config.batch_size = 18
  with pytest.raises(ConfigError, match=r"config\.batch_size=18: must be a multiple of the "
                                        r"number of devices \(4\)"):
    validate_config(config, num_devices=4, check_model=False)
  validate_config(config, num_devices=2, check_model=False)
  with pytest.raises(ConfigError, match=r"multiple of the number of processes \(4\)"):
    validate_config(config, num_devices=2, num_processes=4, check_model=False)
  config.batch_size = 2  # fewer videos than the s=4 clips of a pseudo-video
  with pytest.raises(ConfigError, match=r"config\.batch_size=2: must be >= "
                                        r"montage\.num_clips=4"):
    validate_config(config, num_devices=1, check_model=False)


def test_montage_device_groups_must_split_the_devices_and_hold_enough_videos():
  config = _config()
  config.batch_size = 32
  config.montage.group_devices = 3
  with pytest.raises(ConfigError, match=r"montage\.group_devices=3: must be 0 \(all "
                                        r"devices\) or divide the number of devices \(8\)"):
    validate_config(config, num_devices=8, check_model=False)
  config.montage.group_devices = 1  # 32 / 8 = 4 videos per group: enough for s = 4
  validate_config(config, num_devices=8, check_model=False)
  config.batch_size = 16  # 2 videos per group < s = 4
  with pytest.raises(ConfigError, match=r"leaves 2 videos per group, fewer than "
                                        r"montage\.num_clips=4"):
    validate_config(config, num_devices=8, check_model=False)
  config.montage.group_devices = -1
  with pytest.raises(ConfigError, match=r"montage\.group_devices=-1"):
    validate_config(config, num_devices=8, check_model=False)


def test_missing_training_files_fail_before_any_work(tmp_path):
  config = pretrain.get_config("")
  config.data.train_pattern = str(tmp_path / "nowhere" / "train-*.tfrecord")
  with pytest.raises(ConfigError, match=r"config\.data\.train_pattern=.*matches no file"):
    validate_config(config, num_devices=1, check_model=False)
  (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(b"")
  config.data.train_pattern = str(tmp_path / "train-*.tfrecord")
  validate_config(config, num_devices=1, check_model=False)

  config = _config()
  config.data.name = "synthetic"
  (tmp_path / "a_file").write_text("x")
  config.data.synthetic_dir = str(tmp_path / "a_file")
  with pytest.raises(ConfigError, match=r"config\.data\.synthetic_dir=.*not a directory"):
    validate_config(config, num_devices=1, check_model=False)


def test_synthetic_params_are_checked():
  config = _config()
  config.data.name = "synthetic"
  config.data.synthetic_params.num_train = 0
  with pytest.raises(ConfigError, match=r"config\.data\.synthetic_params: .*num_train=0"):
    validate_config(config, num_devices=1, check_paths=False, check_model=False)


def test_model_combinations_fail_before_compilation():
  # r3d_tiny has C = 256 features; clips of L = 48/2 = 24 frames do not divide it.
  config = _config()
  config.data.num_frames = 48
  config.montage.num_clips = 2
  with pytest.raises(ConfigError, match=r"C=256 must be divisible by the clip length L=24"):
    validate_config(config, num_devices=1)


def test_unknown_preset_and_unknown_field_fail_on_the_command_line(tmp_path):
  """Through the real entry point: non-zero exit and the culprit named, in seconds."""
  base = [sys.executable, "-m", "tcvm_jax.main", f"--workdir={tmp_path}"]
  runs = {
      "preset": base + ["--config=configs/pretrain.py:huge"],
      "field": base + ["--config=configs/pretrain.py:demo", "--config.model.tc_kk=0.3"],
      "range": base + ["--config=configs/pretrain.py:demo", "--config.model.tc_k=2.0"],
  }
  for name, command in runs.items():
    process = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(1),
                             capture_output=True, text=True, timeout=120)
    assert process.returncode != 0, name
    if name == "preset":
      assert "Unknown preset 'huge'" in process.stderr
    elif name == "field":
      assert re.search(r"tc_kk", process.stderr)
    else:
      assert "config.model.tc_k=2.0: must lie in [0.0, 1.0]" in process.stderr
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing started


def test_config_files_load_the_named_file_and_its_preset(tmp_path, monkeypatch):
  # tcvm_jax.config_files: what the scripts with their own arguments load configs with.
  assert (config_files.load_config("configs/retrieval.py:demo").to_dict()
          == retrieval.get_config("demo").to_dict())
  assert (config_files.load_config("configs/pretrain.py").to_dict()
          == pretrain.get_config().to_dict())
  monkeypatch.chdir(tmp_path)  # relative paths are found from the repository root too
  assert (config_files.load_config("configs/pretrain.py:tsm50").to_dict()
          == pretrain.get_config("tsm50").to_dict())
  with pytest.raises(FileNotFoundError):
    config_files.load_config("configs/no_such_config.py")
