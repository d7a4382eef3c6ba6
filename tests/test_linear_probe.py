"""Linear probe: a known softmax model is recovered, train-only statistics, the demo run."""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from configs import linear_probe as probe_config
from tcvm_jax import checkpointing
from tcvm_jax import config_validation
from tcvm_jax import linear_probe
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import retrieval
from tcvm_jax.data import synthetic
from train_test_utils import export_demo_encoder

TINY_DATA_DIR = os.path.join(tempfile.gettempdir(), "tcvm_jax_test_data", "synthetic_tiny")


def test_probe_reaches_the_bayes_accuracy_of_a_known_softmax_model():
  rng = np.random.default_rng(0)
  num_features, num_classes = 8, 3
  true_kernel = 2.0 * rng.normal(size=(num_features, num_classes))
  offset = 5.0 * rng.normal(size=num_features)  # standardisation must undo it

  def sample(n):
    x = rng.normal(size=(n, num_features))
    logits = x @ true_kernel
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(num_classes, p=p) for p in probs])
    return (x + offset).astype(np.float32), labels, np.argmax(logits, 1)

  train_x, train_y, _ = sample(3000)
  test_x, test_y, bayes_prediction = sample(2000)
  classifier, losses = linear_probe.train_linear_classifier(
      train_x, train_y, num_classes, num_epochs=40, batch_size=256, learning_rate=1e-2,
      weight_decay=0.0)
  bayes_accuracy = np.mean(bayes_prediction == test_y)
  probe_accuracy = np.mean(np.argmax(classifier.logits(test_x), 1) == test_y)
  assert abs(probe_accuracy - bayes_accuracy) < 0.03, (probe_accuracy, bayes_accuracy)
  # It found (nearly) the same decision rule, not just the same score.
  assert np.mean(np.argmax(classifier.logits(test_x), 1) == bayes_prediction) > 0.93
  assert losses[-1] < losses[0]
  # Standardisation uses the train split only.
  np.testing.assert_allclose(classifier.mean, train_x.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(classifier.std, train_x.std(0), rtol=1e-4)


def test_labels_outside_the_classes_are_an_error():
  features = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
    linear_probe.train_linear_classifier(features, np.array([0, 1, 2, -1]), 3)


def test_config_errors_name_the_setting():
  config = probe_config.get_config()
  with pytest.raises(config_validation.ConfigError, match="init_checkpoint is empty"):
    linear_probe.validate_config(config)
  config.init_checkpoint = "random"
  config.probe.num_crops = 2
  with pytest.raises(config_validation.ConfigError, match=r"config\.probe\.num_crops=2"):
    linear_probe.validate_config(config)


@pytest.fixture(scope="module")
def pretraining_state(tmp_path_factory):
  """The demo TCVM's state (seed 5) and its encoder export."""
  directory = str(tmp_path_factory.mktemp("pretrain"))
  config, params, batch_stats = export_demo_encoder(directory, seed=5)
  return config, params, batch_stats, directory


def test_in_memory_pretraining_state_probes_the_same_encoder_as_its_export(pretraining_state):
  config, params, batch_stats, directory = pretraining_state
  demo = probe_config.get_config("demo")
  mesh = mesh_lib.create_mesh()
  from_state = linear_probe.source_from_train_state(config, params, batch_stats)
  from_export = retrieval.resolve_encoder(demo, directory)
  assert from_state.backbone == from_export.backbone == "r3d_tiny"
  assert from_state.mean == from_export.mean
  _, state_a = retrieval.build_frozen_encoder(from_state, demo.model, mesh, seed=0)
  _, state_b = retrieval.build_frozen_encoder(from_export, demo.model, mesh, seed=0)
  # The pretraining loop's state holds plain dicts (train_step.TrainState): the same.
  from_dicts = linear_probe.source_from_train_state(config, nnx.to_pure_dict(params),
                                                    nnx.to_pure_dict(batch_stats))
  _, state_c = retrieval.build_frozen_encoder(from_dicts, demo.model, mesh, seed=0)
  flat_a = checkpointing.flatten_by_path(state_a)
  flat_b = checkpointing.flatten_by_path(state_b)
  flat_c = checkpointing.flatten_by_path(state_c)
  assert flat_a.keys() == flat_b.keys() == flat_c.keys() and len(flat_a) > 20
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]))
    np.testing.assert_array_equal(np.asarray(flat_c[key]), np.asarray(flat_b[key]))


def test_demo_preset_end_to_end(pretraining_state, tmp_path):
  _, _, _, directory = pretraining_state
  config = probe_config.get_config("demo")
  config.init_checkpoint = directory
  config.data.synthetic_dir = TINY_DATA_DIR
  config.data.synthetic_params = synthetic.TINY_PARAMS
  mesh = mesh_lib.create_mesh()
  source = retrieval.resolve_encoder(config, directory)
  results, classifier = linear_probe.evaluate(config, source, mesh)

  # The reported accuracy is the classifier's on the test videos' averaged features.
  test = retrieval.extract_video_features(config, source, {"test": (2, 1)}, mesh=mesh)["test"]
  logits = ((test.values - classifier.mean) / classifier.std) @ classifier.kernel
  logits += classifier.bias
  assert results["top1"] == pytest.approx(np.mean(np.argmax(logits, 1) == test.labels))
  assert results["num_classes"] == 12  # the generated label map
  assert (results["num_train_videos"], results["num_test_videos"]) == (40, 20)
  assert results["train_top1"] > 0.5  # 256 features, 40 videos: the probe fits them

  workdir = tmp_path / "probe"
  linear_probe.run(config, str(workdir))
  with open(workdir / "results.json") as f:
    stored = json.load(f)
  assert stored["top1"] == pytest.approx(results["top1"])  # deterministic
  assert 0.0 <= stored["top1"] <= stored["top5"] <= 1.0
  assert stored["protocol"]["test_views"] == "2x1"
  assert stored["protocol"]["encoder"] == os.path.abspath(directory)
