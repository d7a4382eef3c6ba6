r"""Linear probe: a softmax regression on frozen encoder features.

Features are the retrieval features (backbone output mean-pooled, averaged over each
video's clips), standardised with train-split statistics; the classifier is trained on
the train split and tested on the test split (top-1/top-5 per video). One forward pass
per clip and no backpropagation through the encoder: cheap enough to follow pretraining
(also callable in-process: `linear_probe.probe_train_state`).

Presets (after a colon):

  configs/linear_probe.py:ucf101   UCF101 split 1 (data/ucf101_split1, see data/README.md).
  configs/linear_probe.py:hmdb51   HMDB51 split 1 (data/hmdb51_split1).
  configs/linear_probe.py:demo     the built-in synthetic motion dataset (12 classes) with
                                   the pretraining demo's tiny encoder; about a minute on a
                                   2-core CPU.

Run:

  python -m tcvm_jax.main --config=configs/linear_probe.py:ucf101 \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=/tmp/probe_ucf101

`--config.init_checkpoint=random` probes a randomly initialised encoder (the baseline).
Results: WORKDIR/results.json with `top1`, `top5` (fractions), `train_top1` and the
protocol. The paper reports no linear-probe numbers; use it to compare checkpoints.
"""

import ml_collections

from tcvm_jax.data import synthetic


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  preset = preset or "ucf101"
  config.preset = preset
  config.task = "linear_probe"        # what tcvm_jax.main runs.
  config.workdir = f"runs/linear_probe_{preset}"  # used when --workdir is not given.
  config.init_checkpoint = ""         # pretraining WORKDIR (or WORKDIR/encoder), or 'random'.
  config.dataset = preset
  config.num_classes = 101            # -1: count the lines of label_map.txt beside the shards.
  config.seed = 0                     # random-init encoder and the probe's minibatches.
  config.batch_size = 64              # views per device step during feature extraction.

  # --- Data --------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "tfrecord"              # 'tfrecord' or 'synthetic'.
  data.train_pattern = "data/ucf101_split1/train-*.tfrecord"  # test split: same folder.
  data.synthetic_dir = "data/generated/synthetic_motion"
  data.num_frames = 16
  data.frame_stride = 2
  data.sampler = "dense"
  data.short_video = "loop"
  data.input_size = 112               # host-side centre crop (px).
  data.shuffle_buffer = 1             # unused (features are extracted in order).
  data.max_bad_record_fraction = 0.001

  # --- Encoder -----------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.backbone = "auto"             # 'auto': the checkpoint's; a name for 'random'.
  model.dtype = "float32"
  model.bn_momentum = 0.9             # unused (frozen, BatchNorm uses its averages).
  config.augment = augment = ml_collections.ConfigDict()
  augment.mean = (0.485, 0.456, 0.406)  # normalisation for 'random' (else the checkpoint's).
  augment.std = (0.229, 0.224, 0.225)
  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.output_size = 112       # frame size the encoder sees.

  # --- The probe ---------------------------------------------------------------
  config.probe = probe = ml_collections.ConfigDict()
  probe.train_split = "train"
  probe.test_split = "test"
  probe.train_clips = 1               # centre clip per training video (cheap).
  probe.test_clips = 1                # clips per test video, features averaged.
  probe.num_crops = 1                 # 1 or 3 crops per test clip.
  probe.num_epochs = 100
  probe.batch_size = 256
  probe.learning_rate = 1e-3          # AdamW, cosine to zero.
  probe.weight_decay = 1e-4

  if preset == "ucf101":
    pass
  elif preset == "hmdb51":
    data.train_pattern = "data/hmdb51_split1/train-*.tfrecord"
    config.num_classes = 51
  elif preset == "demo":
    data.name = "synthetic"
    # The pretraining demo's dataset (configs/pretrain.py:demo), so the same files are used.
    data.synthetic_params = ml_collections.ConfigDict(synthetic.demo_size_overrides())
    data.input_size = 64
    eval_config.output_size = 56
    config.num_classes = -1           # from the generated label_map.txt (12 motions).
    config.batch_size = 32
    probe.train_clips = 2
    probe.test_clips = 2
    probe.batch_size = 64
  else:
    raise ValueError(f"Unknown preset {preset!r}; choose from 'ucf101', 'hmdb51', 'demo'.")
  return config
