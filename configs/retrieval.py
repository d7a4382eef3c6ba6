r"""Video retrieval with a frozen pretrained encoder (paper Tables 2a/2b).

Every test-split video queries the train-split gallery by cosine similarity of its
encoder features (backbone output mean-pooled, averaged over 10 uniformly spaced clips,
L2-normalised); top-k counts a query as correct if any of its k nearest neighbours
shares its class.

Presets (after a colon):

  configs/retrieval.py:ucf101   UCF101 split 1 (9537 gallery / 3783 queries), TFRecords
                                from `scripts/make_tfrecords.py --format=ucf101 --fold=1
                                --output_dir=data/ucf101_split1` (see data/README.md).
                                The paper reports R3D50 54.2 / 70.2 / 78.2 (top-1/5/10),
                                TSM50 55.5 / 71.5 / 79.1.
  configs/retrieval.py:hmdb51   HMDB51 split 1 (3570 / 1530), `data/hmdb51_split1`.
                                Paper: R3D50 25.4 / 47.5 / 60.1, TSM50 25.9 / 49.8 / 64.1.
  configs/retrieval.py:demo     the built-in synthetic motion dataset (12 classes), tiny
                                encoder, with a random-init baseline row; about a minute
                                on a 2-core CPU. A random r3d_tiny encoder reads mostly the
                                scene, so expect near-chance top-1 on the scene-independent
                                test split; the pretraining demo should do better.

Run:

  python -m tcvm_jax.main --config=configs/retrieval.py:ucf101 \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=/tmp/retrieval_ucf101
  python -m tcvm_jax.main --config=configs/retrieval.py:demo \
      --config.init_checkpoint=/tmp/tcvm_demo --workdir=/tmp/retrieval_demo

Results: WORKDIR/results.json (`top1`, `top5`, `top10` as fractions in [0, 1], the
`protocol`, one entry of `rows` per encoder) and WORKDIR/results.md (a table). Add
`--config.random_baseline=True` for a randomly initialised encoder of the same
architecture as a second row.
"""

import ml_collections

from tcvm_jax.data import synthetic


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  preset = preset or "ucf101"
  config.preset = preset
  config.task = "retrieval"           # what tcvm_jax.main runs.
  config.workdir = f"runs/retrieval_{preset}"  # used when --workdir is not given.
  config.init_checkpoint = ""         # pretraining WORKDIR (or WORKDIR/encoder), or 'random'.
  config.random_baseline = False      # add a random-init encoder row (same architecture).
  config.seed = 0                     # initialises the random-init encoder.
  config.batch_size = 64              # views per device step (global).

  # --- Data (DMVR TFRecords; labels required) ----------------------------------
  config.dataset = preset             # a name for the results table.
  config.data = data = ml_collections.ConfigDict()
  data.name = "tfrecord"              # 'tfrecord' or 'synthetic'.
  data.train_pattern = "data/ucf101_split1/train-*.tfrecord"  # other splits: same folder.
  data.synthetic_dir = "data/generated/synthetic_motion"
  data.num_frames = 16                # frames per clip (the encoder keeps every frame).
  data.frame_stride = 2               # dense sampler stride, as in pretraining.
  data.sampler = "dense"              # uniformly spaced dense clips ('tsn' allows 1 clip).
  data.short_video = "loop"           # videos shorter than a clip: 'loop' or 'pad'.
  data.input_size = 112               # host-side centre crop (px) of the stored frames.
  data.shuffle_buffer = 1             # unused (evaluation reads in order).
  data.max_bad_record_fraction = 0.001

  # --- Encoder ---------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.backbone = "auto"             # 'auto': the checkpoint's; or a name for 'random'.
  model.dtype = "float32"             # compute dtype: 'float32' or 'bfloat16'.
  model.bn_momentum = 0.9             # unused at evaluation (BatchNorm uses its averages).
  # Input normalisation when there is no checkpoint (else the pretraining run's).
  config.augment = augment = ml_collections.ConfigDict()
  augment.mean = (0.485, 0.456, 0.406)
  augment.std = (0.229, 0.224, 0.225)
  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.output_size = 112       # frame size the encoder sees (centre crop, resized).

  # --- Protocol ----------------------------------------------------------------
  config.retrieval = retrieval = ml_collections.ConfigDict()
  retrieval.num_clips = 10            # uniformly spaced clips per video, features averaged.
  retrieval.num_crops = 1             # 1 (centre) or 3 (side-centre-side) crops per clip.
  retrieval.query_split = "test"
  retrieval.gallery_split = "train"
  retrieval.ks = (1, 5, 10)           # top-k accuracies to report.
  retrieval.block_size = 4096         # gallery rows per on-device similarity block.
  retrieval.query_block_size = 1024   # queries per step (sharded over devices).

  if preset == "ucf101":
    pass
  elif preset == "hmdb51":
    data.train_pattern = "data/hmdb51_split1/train-*.tfrecord"
  elif preset == "demo":
    # The pretraining demo's dataset (configs/pretrain.py:demo), so the same files are used.
    data.name = "synthetic"
    data.synthetic_params = ml_collections.ConfigDict(synthetic.demo_size_overrides())
    data.num_frames = 16
    data.input_size = 64
    eval_config.output_size = 56
    model.backbone = "r3d_tiny"       # used by the random-init row; 'auto' also works.
    config.random_baseline = True
    config.batch_size = 32
    retrieval.block_size = 256        # small, so the demo exercises several blocks.
  else:
    raise ValueError(f"Unknown preset {preset!r}; choose from 'ucf101', 'hmdb51', 'demo'.")
  return config
