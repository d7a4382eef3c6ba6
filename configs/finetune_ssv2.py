r"""Fine-tuning a pretrained encoder with multi-view testing (paper Table 1).

The backbone starts from the pretraining export (all but the TC/OFC heads, which are not
exported) and a fresh linear classifier is added; everything is trained with SGD
(momentum 0.9), lr 0.005 for a batch of 32 (scaled linearly), on 8-frame clips at
224x224. Testing averages softmax scores over views: R3D 10 clips x 3 crops, TSM 2 x 3,
plus the 1-view test (`eval.views=()` picks these from the backbone).

Presets (after a colon):

  configs/finetune_ssv2.py          Something-Something v2 (174 classes), TFRecords from
                                    `scripts/make_tfrecords.py --format=ssv2
                                    --short_side=256 --output_dir=data/ssv2`; tested on the
                                    `validation` split. No horizontal flips: SSv2 labels
                                    such as "left to right" depend on direction.
                                    The paper reports R3D50 55.8 (1 view) / 59.3 (10x3)
                                    top-1, TSM50 58.5 (1 view) / 60.7 (2x3).
  configs/finetune_ssv2.py:ucf101   UCF101 split 1 (data/ucf101_split1, 101 classes).
  configs/finetune_ssv2.py:hmdb51   HMDB51 split 1 (data/hmdb51_split1, 51 classes).
  configs/finetune_ssv2.py:demo     the built-in synthetic motion dataset on the
                                    pretraining demo's tiny encoder; a few minutes on a
                                    2-core CPU. No flips (classes include move_left/right).

Run:

  python -m tcvm_jax.main --config=configs/finetune_ssv2.py \
      --config.init_checkpoint=PRETRAIN_WORKDIR --workdir=/tmp/finetune_ssv2
  python -m tcvm_jax.main --config=configs/finetune_ssv2.py:demo \
      --config.init_checkpoint=/tmp/tcvm_demo --workdir=/tmp/finetune_demo

`--config.init_checkpoint=random` gives the random-init baseline. Results:
WORKDIR/results.json with `views` ({'1x1': {top1, top5, ...}, '10x3': {...}}), top-level
`top1`/`top5` of the last view setting, and the protocol. Rerunning the same command
resumes from WORKDIR/checkpoints.
"""

import ml_collections

from tcvm_jax.data import synthetic


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  preset = preset or "ssv2"
  config.preset = preset
  config.task = "finetune"            # what tcvm_jax.main runs.
  config.workdir = f"runs/finetune_{preset}"  # used when --workdir is not given.
  config.init_checkpoint = ""         # pretraining WORKDIR (or WORKDIR/encoder), or 'random'.
  config.dataset = preset             # a name for the results.
  config.num_classes = 174            # -1: count the lines of label_map.txt beside the shards.
  config.seed = 0

  # --- Data ------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "tfrecord"              # 'tfrecord' or 'synthetic'.
  data.train_pattern = "data/ssv2/train-*.tfrecord"  # test split: same folder.
  data.synthetic_dir = "data/generated/synthetic_motion"
  data.num_frames = 8                 # frames per clip (train and test).
  data.frame_stride = 4               # dense sampler stride (the pipeline's 'tsn' sampler
                                      # allows only 1 test clip).
  data.sampler = "dense"
  data.short_video = "loop"
  data.input_size = 256               # host-side crop (px) of the stored frames.
  data.shuffle_buffer = 1024
  data.max_bad_record_fraction = 0.001

  # --- Train augmentation (on device, per video) -------------------------------
  config.augment = aug = ml_collections.ConfigDict()
  aug.output_size = 224               # training frame size.
  aug.crop_scale = (0.25, 1.0)        # RandomResizedCrop area range.
  aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  aug.flip_prob = 0.0                 # 0 for direction-dependent labels (SSv2).
  # Input normalisation when init_checkpoint='random' (else the pretraining run's).
  aug.mean = (0.485, 0.456, 0.406)
  aug.std = (0.229, 0.224, 0.225)

  # --- Model -------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.backbone = "auto"             # 'auto': the checkpoint's; a name for 'random'.
  model.dtype = "float32"             # compute dtype: 'float32' or 'bfloat16'.
  model.bn_momentum = 0.9
  model.dropout_rate = 0.5            # before the classifier (SlowFast's default).
  # How the stem and each block's last ReLU compute (same values), as in configs/pretrain.py.
  model.stem_layout = "auto"          # 'auto' (blocks on CUDA), 'pixels', 'blocks'.
  model.stem_pool_gradient = "auto"   # 'auto' (= 'stack'), 'stack', 'select'.
  model.block_relu_gradient = "auto"  # 'auto' (= 'from_input'), 'from_input', 'from_output'.
  model.conv1x1_kernel = "auto"       # 'auto' (= 'xla'), 'xla', 'pallas', 'pallas_all'.
  model.bn_fold = "auto"  # 'auto' (= 'none' yet), 'none', 'widening_4x', 'widening_2x'.
  model.tsm_shift = "auto"            # TSM only: 'auto' (= 'fused'), 'fused', 'barrier'.

  # --- Optimisation (optim.py: lr = base_learning_rate * batch_size / 32) --------
  config.batch_size = 32              # global batch of training videos.
  config.base_learning_rate = 0.005   # the paper's fine-tuning lr.
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0
  config.schedule = "step"            # 'step' or 'cosine'.
  config.decay_epochs = (14, 18)      # SlowFast's SSv2 schedule (22 epochs).
  config.decay_factor = 0.1
  config.warmup_epochs = 0.0
  config.num_epochs = 22
  config.num_train_steps = -1         # -1: from num_epochs and the dataset size.
  # The train state between steps: 'flat' (params, statistics and momentum as vectors, SGD
  # on the vectors; tcvm_jax/flat_state.py) or 'tree' (its arrays as they are).
  config.state_layout = "flat"

  # --- Testing -----------------------------------------------------------------
  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.split = "validation"    # SSv2's test split has no labels.
  eval_config.output_size = 224       # test frame size (each crop resized to it).
  eval_config.views = ()              # ((clips, crops), ...); () = by backbone (see above).
  eval_config.batch_size = 32         # views per device step (global).
  config.eval_every_steps = -1        # > 0: a 1-view test every N steps (TensorBoard).

  # --- Bookkeeping -------------------------------------------------------------
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  if preset == "ssv2":
    pass
  elif preset in ("ucf101", "hmdb51"):
    data.train_pattern = f"data/{preset}_split1/train-*.tfrecord"
    data.input_size = 128             # the converter's default short side.
    data.frame_stride = 2
    config.num_classes = 101 if preset == "ucf101" else 51
    aug.flip_prob = 0.5
    aug.output_size = 112
    eval_config.output_size = 112
    eval_config.split = "test"
    config.schedule = "cosine"
    config.num_epochs = 50
  elif preset == "demo":
    data.name = "synthetic"
    # The pretraining demo's dataset (configs/pretrain.py:demo), so the same files are used.
    data.synthetic_params = ml_collections.ConfigDict(synthetic.demo_size_overrides())
    data.frame_stride = 2
    data.input_size = 64
    data.shuffle_buffer = 256
    config.num_classes = -1           # from the generated label_map.txt (12 motions).
    aug.output_size = 56
    eval_config.output_size = 56
    eval_config.split = "test"
    eval_config.views = ((1, 1), (2, 3))
    model.backbone = "auto"
    config.batch_size = 16
    config.schedule = "cosine"
    config.base_learning_rate = 0.05  # higher than the paper's: a few hundred steps.
    config.num_epochs = 3
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
  else:
    raise ValueError(f"Unknown preset {preset!r}; choose from 'ssv2', 'ucf101', 'hmdb51', "
                     "'demo'.")
  return config
