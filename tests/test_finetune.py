"""Fine-tuning: pretrained weights really load, heads stay fresh, views are averaged right."""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune_ssv2
from tcvm_jax import augment
from tcvm_jax import checkpointing
from tcvm_jax import config_validation
from tcvm_jax import finetune
from tcvm_jax import flat_state
from tcvm_jax import mesh as mesh_lib
from tcvm_jax import retrieval
from tcvm_jax.data import synthetic
from train_test_utils import export_demo_encoder, set_field

TINY_DATA_DIR = os.path.join(tempfile.gettempdir(), "tcvm_jax_test_data", "synthetic_tiny")


def flat(state) -> dict[str, np.ndarray]:
  return {"/".join(path): np.asarray(value)
          for path, value in checkpointing.flatten_by_path(state).items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining-style export of the demo TCVM (backbone + TC/OFC heads, seed 3)."""
  directory = str(tmp_path_factory.mktemp("pretrain"))
  # Running statistics as after training (fresh ones are all 0 / 1).
  _, params, batch_stats = export_demo_encoder(directory, seed=3, stats_offset=0.25)
  return directory, flat(params), flat(batch_stats)


def demo_config(**overrides):
  config = finetune_ssv2.get_config("demo")
  config.data.synthetic_dir = TINY_DATA_DIR
  config.data.synthetic_params = synthetic.TINY_PARAMS
  for key, value in overrides.items():
    set_field(config, key, value)
  return config


def test_backbone_loads_pretrained_weights_and_classifier_starts_fresh(pretrained):
  directory, pretrained_params, pretrained_stats = pretrained
  config = demo_config(init_checkpoint=directory)
  source = retrieval.resolve_encoder(config, directory)
  assert source.backbone == "r3d_tiny"
  _, _, params, batch_stats = finetune.init_classifier(source, config, 12, seed=0)
  _, _, fresh_params, fresh_stats = finetune.init_classifier(source.random_like(), config, 12,
                                                             seed=0)
  params, batch_stats = flat(params), flat(batch_stats)
  fresh_params, fresh_stats = flat(fresh_params), flat(fresh_stats)

  # Exactly the backbone is loaded: every leaf, params and BatchNorm statistics.
  backbone_keys = {k for k in params if k.startswith("backbone/")}
  assert backbone_keys == {k for k in pretrained_params if k.startswith("backbone/")}
  for key in backbone_keys:
    np.testing.assert_array_equal(params[key], pretrained_params[key], err_msg=key)
  for key in batch_stats:
    np.testing.assert_array_equal(batch_stats[key], pretrained_stats[key], err_msg=key)
  # ... and it changed the model: conv kernels and statistics differ from a fresh init.
  changed = [k for k in backbone_keys if not np.array_equal(params[k], fresh_params[k])]
  kernels = [k for k in backbone_keys if k.endswith("kernel")]
  assert set(kernels) <= set(changed) and len(kernels) >= 10
  assert all(not np.array_equal(batch_stats[k], fresh_stats[k]) for k in batch_stats)

  # Heads: TC/OFC are not part of the classifier; the classifier is the fresh one.
  assert not any(k.startswith(("tc_head", "ofc_head")) for k in params)
  assert {k for k in params if not k.startswith("backbone/")} == {
      "classifier/kernel", "classifier/bias"}
  for key in ("classifier/kernel", "classifier/bias"):
    # The same draws; eager vs compiled scaling may differ in the last bit.
    np.testing.assert_allclose(params[key], fresh_params[key], rtol=1e-6, atol=0)
  assert params["classifier/kernel"].shape == (256, 12)
  assert 0.005 < params["classifier/kernel"].std() < 0.02  # N(0, 0.01)


def test_architecture_mismatch_is_a_clear_error(pretrained):
  directory, _, _ = pretrained
  config = demo_config(**{"model.backbone": "tsm_tiny"})
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.model\.backbone='tsm_tiny'.*'r3d_tiny' encoder"):
    retrieval.resolve_encoder(config, directory)


def test_views_follow_the_backbone_family():
  config = finetune_ssv2.get_config()
  assert finetune.views_for(config, "r3d50") == ((1, 1), (10, 3))
  assert finetune.views_for(config, "tsm50") == ((1, 1), (2, 3))
  config.eval.views = ((4, 1),)
  assert finetune.views_for(config, "tsm50") == ((4, 1),)


def test_classification_accuracy_matches_brute_force():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(200, 7))
  labels = rng.integers(0, 7, 200)
  accuracy = finetune.classification_accuracy(scores, labels, ks=(1, 5))
  for k in (1, 5):
    expected = np.mean([labels[i] in sorted(range(7), key=lambda c: -scores[i, c])[:k]
                        for i in range(200)])
    assert accuracy[f"top{k}"] == pytest.approx(expected)
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 7\)"):
    finetune.classification_accuracy(scores, np.full(200, 7))


def test_multi_view_scores_average_exactly_the_views_of_each_video():
  """A fake model whose score for a view is known: its pixel value picks the class."""
  num_videos, num_views, num_classes = 5, 30, 4  # 30 = R3D's 10 clips x 3 crops
  rng = np.random.default_rng(1)
  # View w of video v votes for class votes[v, w] (encoded in the pixels).
  votes = rng.integers(0, num_classes, (num_videos, num_views))
  labels = rng.integers(0, num_classes, num_videos)
  rows = rng.permutation(num_videos * num_views)  # views arrive shuffled over batches

  def batches(drop_last_view: bool = False):
    keep = rows if not drop_last_view else rows[rows != num_videos * num_views - 1]
    for start in range(0, keep.size, 8):
      chunk = keep[start:start + 8]
      video, view = chunk // num_views, chunk % num_views
      pad = 8 - chunk.size
      pixels = np.concatenate([votes[video, view], np.zeros(pad, np.int64)])
      yield {"video": np.broadcast_to(pixels[:, None, None, None, None].astype(np.uint8),
                                      (8, 2, 4, 4, 3)).copy(),
             "video_index": np.concatenate([video, -np.ones(pad, np.int64)]),
             "label": np.concatenate([labels[video], -np.ones(pad, np.int64)]),
             "mask": np.arange(8) < chunk.size}

  def fake_scores(state, videos):
    del state
    return jax.nn.one_hot(videos[:, 0, 0, 0, 0].astype(jnp.int32), num_classes)

  runner = retrieval.make_view_runner(fake_scores, mesh_lib.create_mesh())
  outputs = retrieval.average_over_views(runner, None, batches(), expected_views=num_views)
  expected_scores = np.stack([np.bincount(votes[v], minlength=num_classes) / num_views
                              for v in range(num_videos)])
  np.testing.assert_allclose(outputs.values, expected_scores, rtol=1e-6)
  np.testing.assert_array_equal(outputs.num_views, num_views)
  np.testing.assert_array_equal(outputs.labels, labels)

  accuracy = finetune.multi_view_accuracy(runner, None, batches(), num_views=num_views)
  ranking = np.argsort(-expected_scores, axis=1, kind="stable")
  assert accuracy["top1"] == pytest.approx(np.mean(ranking[:, 0] == labels))
  assert accuracy["num_videos"] == num_videos and accuracy["num_views"] == num_views
  with pytest.raises(ValueError, match=r"other than 30"):
    finetune.multi_view_accuracy(runner, None, batches(drop_last_view=True), num_views=30)


def test_eval_pipeline_views_are_grouped_per_video():
  """2 clips x 3 crops from the real eval pipeline, scored by a pixel-mean fake model."""
  from tcvm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = demo_config()

  def fake_scores(state, videos):
    del state
    return videos.astype(jnp.float32).mean(axis=(1, 2, 3))  # (B, 3)

  def views():
    return pipeline.make_eval_dataset(config, "test", batch_size_per_process=8, num_clips=2,
                                      num_crops=3)

  runner = retrieval.make_view_runner(fake_scores, mesh_lib.create_mesh())
  outputs = retrieval.average_over_views(runner, None, views(), expected_views=6)
  reference: dict[int, list[np.ndarray]] = {}
  for batch in views():
    for i in np.flatnonzero(batch["mask"]):
      reference.setdefault(int(batch["video_index"][i]), []).append(
          batch["video"][i].astype(np.float64).mean(axis=(0, 1, 2)))
  assert len(reference) == synthetic.TINY_PARAMS["num_test"] == outputs.video_index.size
  assert all(len(v) == 6 for v in reference.values())
  np.testing.assert_allclose(outputs.values,
                             [np.mean(reference[int(i)], axis=0) for i in outputs.video_index],
                             rtol=1e-5)


def test_train_augmentation_is_a_random_resized_crop_and_flip():
  rng = np.random.default_rng(2)
  videos = jnp.asarray(rng.integers(0, 256, (2, 3, 20, 20, 3), dtype=np.uint8))
  config = finetune_ssv2.get_config("demo").augment
  config.crop_scale, config.crop_ratio = (1.0, 1.0), (1.0, 1.0)  # the whole square frame
  mean, std = augment.IMAGENET_MEAN, augment.IMAGENET_STD
  reference = jax.jit(lambda v: retrieval.preprocess_views(v, 12, mean, std))(videos)

  def augmented():  # compiled, as in the train step (op-by-op is slow)
    return jax.jit(lambda key, v: finetune.augment_videos(key, v, config, 12, mean, std))(
        jax.random.key(0), videos)

  config.flip_prob = 0.0
  np.testing.assert_allclose(augmented(), reference, atol=1e-5)
  config.flip_prob = 1.0
  np.testing.assert_allclose(augmented(), reference[:, :, :, ::-1], atol=1e-5)


def test_config_errors_name_the_setting():
  config = finetune_ssv2.get_config()
  with pytest.raises(config_validation.ConfigError, match="init_checkpoint is empty"):
    finetune.validate_config(config)
  config.init_checkpoint = "random"
  config.eval.views = ((10, 2),)
  with pytest.raises(config_validation.ConfigError, match=r"config\.eval\.views"):
    finetune.validate_config(config)
  config.eval.views = ()
  config.model.dropout_rate = 1.0
  with pytest.raises(config_validation.ConfigError, match=r"config\.model\.dropout_rate=1\.0"):
    finetune.validate_config(config)
  config.model.dropout_rate = 0.5
  config.model.stem_layout = "columns"
  with pytest.raises(config_validation.ConfigError, match=r"config\.model\.stem_layout"):
    finetune.validate_config(config)
  config.model.stem_layout = "auto"
  config.state_layout = "buffers"
  with pytest.raises(config_validation.ConfigError, match=r"config\.state_layout"):
    finetune.validate_config(config)
  config.state_layout = "flat"
  config.model.conv1x1_kernel = "cudnn"
  with pytest.raises(config_validation.ConfigError, match=r"config\.model\.conv1x1_kernel"):
    finetune.validate_config(config)


def test_layout_switches_reach_the_fine_tuned_backbone(pretrained):
  directory, _, _ = pretrained
  config = demo_config(**{"init_checkpoint": directory, "model.stem_layout": "blocks",
                          "model.block_relu_gradient": "from_output"})
  source = retrieval.resolve_encoder(config, directory)
  backbone = retrieval.create_backbone_fn(source, config.model, seed=0)()
  assert backbone.stem_layout == "blocks"
  assert all(block.block_relu_gradient == "from_output"
             for blocks in backbone.stages for block in blocks)


def test_flat_state_step_and_scores_match_the_tree(pretrained):
  # Fine-tuning carries its state as pretraining does (config.state_layout 'flat'): SGD on
  # the flat vectors gives the tree's loss, norms and params over 2 steps, and the test
  # scores read the carried state alike.
  directory, _, _ = pretrained
  config = demo_config(init_checkpoint=directory, batch_size=4)
  mesh = mesh_lib.create_mesh()
  source = retrieval.resolve_encoder(config, directory)
  graphdef, eval_graphdef, params, batch_stats = finetune.init_classifier(source, config, 12,
                                                                          seed=0)
  optimizer, schedule = finetune.optim.create_optimizer(config, 10, 100)
  state = finetune.create_train_state(params, batch_stats, optimizer, mesh, seed=0)
  replicated = mesh_lib.replicated_sharding(mesh)
  forms = {"tree": flat_state.TreeForm(), "flat": flat_state.form_for(config, state)}
  assert isinstance(forms["flat"], flat_state.FlatForm)  # the config's default
  rng = np.random.default_rng(0)
  size = config.data.input_size
  videos = jnp.asarray(rng.integers(0, 256, (4, config.data.num_frames, size, size, 3)),
                       jnp.uint8)
  labels = jnp.asarray([0, 3, 7, 11], jnp.int32)
  out = {}
  for name, form in forms.items():
    step = jax.jit(finetune.make_train_step(config, graphdef, optimizer, schedule,
                                            mean=source.mean, std=source.std, form=form))
    carried = form.jit_to_carried(replicated)(state)
    history = []
    for _ in range(2):
      carried, metrics = step(carried, videos, labels)
      history.append({k: float(v) for k, v in metrics.items()})
    scores = jax.jit(finetune.make_score_fn(eval_graphdef, out_size=32, mean=source.mean,
                                            std=source.std, dtype=jnp.float32, form=form))
    out[name] = (history, form.jit_to_tree(replicated)(carried), scores(carried, videos))
  (tree_history, tree_state, tree_scores), (flat_history, flat_result, flat_scores) = (
      out["tree"], out["flat"])
  for tree_metrics, flat_metrics in zip(tree_history, flat_history):
    for name in ("loss", "grad_norm", "param_norm", "accuracy"):
      assert flat_metrics[name] == pytest.approx(tree_metrics[name], rel=1e-5), name
  for a, b in zip(jax.tree.leaves(flat_result["params"]), jax.tree.leaves(tree_state["params"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
  np.testing.assert_allclose(flat_scores, tree_scores, rtol=1e-5, atol=1e-6)
  assert int(flat_result["step"]) == 2


def test_demo_preset_trains_tests_and_resumes(pretrained, tmp_path):
  directory, _, _ = pretrained
  workdir = str(tmp_path / "finetune")
  config = demo_config(init_checkpoint=directory, num_train_steps=2, log_every_steps=1,
                       **{"eval.views": ((1, 1), (1, 3))})
  results = finetune.run(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    stored = json.load(f)
  assert stored["step"] == 2 and stored["resumed_from_step"] is None
  assert [h["step"] for h in stored["history"]] == [1, 2]
  assert np.isfinite(stored["train"]["loss"]) and stored["train"]["learning_rate"] > 0
  # 20 test videos (TINY_PARAMS), each seen as 1 and as 1 x 3 views.
  assert stored["views"]["1x1"]["num_videos"] == 20 and stored["views"]["1x1"]["num_views"] == 1
  assert stored["views"]["1x3"]["num_views"] == 3
  for view in stored["views"].values():
    assert 0.0 <= view["top1"] <= view["top5"] <= 1.0
  assert stored["top1"] == stored["views"]["1x3"]["top1"] == results["top1"]
  assert stored["protocol"]["num_classes"] == 12 and stored["protocol"]["init"] == directory
  assert stored["protocol"]["peak_learning_rate"] == pytest.approx(0.05 * 16 / 32)

  # The same command with more steps resumes from the saved step.
  config = demo_config(init_checkpoint=directory, num_train_steps=3, log_every_steps=1,
                       **{"eval.views": ((1, 1),)})
  resumed = finetune.run(config, workdir)
  assert resumed["resumed_from_step"] == 2 and resumed["step"] == 3
  assert [h["step"] for h in resumed["history"]] == [3]
