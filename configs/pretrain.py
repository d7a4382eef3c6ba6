r"""TCVM self-supervised pretraining.

Presets (after a colon):

  configs/pretrain.py          the paper's setting (Sec. 4.1): R3D50 on Kinetics-400
                               TFRecords, 32 frames at stride 2 cut into s=4 clips,
                               112x112, tau=0.07, alpha=beta=0.5, k=0.5, SGD momentum
                               0.9, lr 0.1 per 32 videos (linear scaling), wd 1e-4,
                               200 epochs, x0.1 at epochs 50/100/150.
  configs/pretrain.py:tsm50    the same with the TSM50 backbone.
  configs/pretrain.py:demo     a tiny backbone on the built-in synthetic motion dataset
                               (generated on first use), 310 steps, then video retrieval
                               with the exported encoder; about 4-6 minutes on a 2-core
                               CPU. Expect the loss to fall from ~4.1 to ~2.9; retrieval
                               top-1 stays near chance (~6-9 %, 12 classes) at this length.

Run:

  python -m tcvm_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/tcvm_demo

Any field can be overridden, e.g. `--config.batch_size=64 --config.num_train_steps=100`.
"""

import ml_collections

from tcvm_jax.data import synthetic


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  preset = preset or "r3d50"
  config.preset = preset

  # --- Data -----------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "tfrecord"            # 'tfrecord' (DMVR-format shards) or 'synthetic'.
  data.train_pattern = "data/kinetics400/train-*.tfrecord"  # glob of training shards.
  data.synthetic_dir = "data/generated/synthetic_motion"    # where 'synthetic' lives.
  data.num_frames = 32              # frames per sampled video (T).
  data.frame_stride = 2             # temporal stride of the dense ("I3D") sampler.
  data.sampler = "dense"            # 'dense' (I3D, the paper's) or 'tsn' (Table 3e).
  data.short_video = "loop"         # videos shorter than needed: 'loop' or 'pad'.
  data.input_size = 128             # host-side crop (px) handed to the device.
  data.shuffle_buffer = 1024
  data.max_bad_record_fraction = 0.001  # fail the run past this share of bad records.

  # --- Video Montage (Sec. 3.2) ---------------------------------------------
  config.montage = montage = ml_collections.ConfigDict()
  montage.num_clips = 4             # s: clips per video / per pseudo-video.
  montage.variant = "C-A-S"         # Table 3d: 'C-A-S', 'A-C-S', 'C-S-A', 'C-A'.
  montage.output_size = 112         # frame size the backbone sees.
  montage.group_devices = 0         # shuffle within groups of this many devices; 0: all
                                    # (the paper). Bounds the clip exchange on many devices.

  # --- On-device augmentation (MoCo v2 recipe, per clip) ---------------------
  config.augment = aug = ml_collections.ConfigDict()
  aug.crop_scale = (0.2, 1.0)       # RandomResizedCrop area range.
  aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  aug.flip_prob = 0.5
  aug.jitter_prob = 0.8
  aug.brightness = 0.4
  aug.contrast = 0.4
  aug.saturation = 0.4
  aug.hue = 0.1
  aug.grayscale_prob = 0.2
  aug.blur_prob = 0.5
  aug.blur_sigma = (0.1, 2.0)       # in pixels of a 224 px image, scaled to output_size.
  aug.mean = (0.485, 0.456, 0.406)  # ImageNet normalisation after augmentation.
  aug.std = (0.229, 0.224, 0.225)
  # How the augmentation computes (never what: the same augmentation up to rounding). Each
  # 'auto' takes augment.AUTO_ON_CUDA on CUDA, AUTO_ELSEWHERE elsewhere; on an H200 the
  # three CUDA choices together took the paper's batch from 2.49 to 0.87 ms.
  # The planes between its passes: 'float32', 'bfloat16' (half the bytes per pass; each
  # pass still computes in float32); 'auto' = bfloat16 on CUDA (2.49 -> 1.70 ms), float32
  # elsewhere (bfloat16 is slower on CPU).
  aug.plane_dtype = "auto"
  # The blur along H: 'taps' (11 shifted multiply-adds over a reflect-padded copy) or
  # 'matmul' (a (S, S) filter, no padded copy); 'auto' = matmul on CUDA (1.70 -> 1.33 ms),
  # taps elsewhere.
  aug.blur_rows = "auto"
  # The colour jitter and grayscale: 'xla' (~20 passes over the planes), 'pallas' (on CUDA
  # one fused kernel, `tcvm_jax/jitter_kernel.py`; the XLA form elsewhere); 'auto' =
  # pallas on CUDA (1.70 -> 1.19 ms), xla elsewhere.
  aug.jitter_kernel = "auto"

  # --- Model -----------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.backbone = "r3d50"          # 'r3d50', 'tsm50', 'r3d_tiny', 'tsm_tiny'.
  model.dtype = "float32"           # compute dtype: 'float32' or 'bfloat16' (params stay f32).
  model.bn_axis_name = None         # None under jit sharding: BN stats are global already.
  model.bn_momentum = 0.9
  # BatchNorm's training gradient: 'closed_form' (two sums + one pass), 'autodiff' (flax),
  # 'auto' = closed form on CPU (~5 % faster demo step there), autodiff on GPU/TPU.
  model.bn_gradient = "auto"
  # BatchNorm's two per-channel sums (of x and x^2 forward; of dy and dy * (x - mean) in the
  # closed-form gradient): 'separate' (two reductions), 'one_reduction' (one variadic
  # reduction, one read of x; ~10x slower on CPU), 'auto' = one reduction on CUDA (R3D50
  # step 2.4 % faster on an H200), separate elsewhere.
  model.bn_statistics = "auto"
  # The stem's conv and max-pool: 'pixels' (strided ops), 'blocks' (dense ops over 4x4
  # blocks of pixels, tcvm_jax/stem.py), 'auto' = blocks on CUDA (the R3D50 step 2.7 %
  # faster chained on an H200), pixels elsewhere (slower on the CPU).
  model.stem_layout = "auto"
  # How the block stem's max-pool backward assembles the 2 x 2 pixels of a block: 'stack'
  # (XLA's concatenate fusion, 0.82 ms at 1.3 TB/s on an H200) or 'select' (one select per
  # value, a loop fusion); the same values. 'auto' = stack until measured on a GPU.
  model.stem_pool_gradient = "auto"
  # Where the gradient of each residual block's last ReLU finds its mask: 'from_input'
  # (autodiff; the pre-activation sum is kept for the backward pass), 'from_output' (the
  # block's output, kept anyway), 'auto' = from_input until measured on a GPU.
  model.block_relu_gradient = "auto"
  # The blocks' stride-1 1x1 convs: 'xla' (a matmul; BatchNorm's apply and statistics are
  # passes of their own), 'pallas_all' (on CUDA one Pallas kernel per conv that applies
  # the BatchNorm + ReLU before conv_c and sums the output for the BatchNorm after it,
  # tcvm_jax/conv1x1_kernel.py; XLA ops elsewhere) or 'pallas' (the kernel only where the
  # matmul is memory-bound: R3D50's stages 1-2). The same values up to rounding. 'auto' =
  # xla: on an H200 the kernels made the R3D50 step 1.9 % ('pallas') and 3.8 % slower.
  model.conv1x1_kernel = "auto"
  # Training-mode BatchNorm after the blocks' widening 1x1 convs: 'none' (conv, then
  # BatchNorm) or folded into the conv: statistics from the input's Gram matrix, gradient
  # from the weight gradient's matmul (the conv's output is read once, to normalise it;
  # in / out more FLOPs; tcvm_jax/folded_batch_norm.py) for the convs that widen >= 4x
  # ('widening_4x': conv_c, stage 1's shortcut) or >= 2x ('widening_2x': every shortcut
  # too). The same values up to rounding. 'auto' = none; on CUDA what
  # backbones.CUDA_AUTO_BN_FOLD names ('none' until measured on a GPU). Needs
  # conv1x1_kernel 'auto' or 'xla'.
  model.bn_fold = "auto"
  # TSM only: how the temporal shift meets conv_a. 'fused' (XLA may fuse it into the op
  # that reads it) or 'barrier' (materialised behind an optimization barrier, so no
  # Triton GEMM fusion takes the concatenation in: the suspected trigger of XLA's abort
  # compiling TSM50 with them, tcvm_jax/xla_options.py). The same values. 'auto' = fused
  # until measured on a GPU.
  model.tsm_shift = "auto"
  model.tc_k = 0.5                  # share of channels that take frame differences, in [0, 1].
  model.tc_second_order = False     # D^2 in Table 3c.
  model.tc_hidden_dim = -1          # per-frame FC width before f; -1 means C.
  model.ofc_hidden_dim = 2048       # OFC MLP: C -> hidden -> ofc_dim.
  model.ofc_dim = 128

  # --- Loss (Eq. 1-3) --------------------------------------------------------
  config.loss = loss = ml_collections.ConfigDict()
  loss.temperature = 0.07
  loss.alpha = 0.5                  # weight of L_origin (OFC).
  loss.beta = 0.5                   # weight of L_diff (TC).
  loss.positive_reduction = "mean"  # 'mean' over positives per anchor (SupCon) or 'sum'.

  # --- Optimisation ----------------------------------------------------------
  config.batch_size = 32            # global batch of source videos.
  config.base_learning_rate = 0.1   # for a global batch of 32; scaled linearly.
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = "step"          # 'step' or 'cosine' (Table 3e).
  config.decay_epochs = (50, 100, 150)
  config.decay_factor = 0.1
  config.warmup_epochs = 0.0
  config.num_epochs = 200
  config.num_train_steps = -1       # -1: derived from num_epochs and the dataset size.
  config.seed = 0
  # How the train state crosses the jitted step's boundary: 'flat' (params, statistics and
  # momentum as one vector per dtype, the optimizer run on the vectors;
  # tcvm_jax/flat_state.py: 6 leaves, ~2 ms less host time per call than 'tree' on the
  # H200 machine, one update pass) or 'tree' (its ~450 arrays as they are).
  config.state_layout = "flat"

  # --- Bookkeeping -----------------------------------------------------------
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  if preset == "r3d50":
    pass
  elif preset == "tsm50":
    model.backbone = "tsm50"
  elif preset == "demo":
    data.name = "synthetic"
    # SyntheticParams of tcvm_jax/data/synthetic.py: 1000 train / 300 test videos of
    # 32-48 frames at 128x160, generated in about a minute on 2 cores.
    data.synthetic_params = ml_collections.ConfigDict(synthetic.demo_size_overrides())
    data.num_frames = 16
    data.frame_stride = 2
    data.input_size = 64
    data.shuffle_buffer = 256
    montage.output_size = 56
    model.backbone = "r3d_tiny"
    model.ofc_hidden_dim = 128
    model.ofc_dim = 64
    config.batch_size = 16
    config.schedule = "cosine"
    config.warmup_epochs = 1.0
    config.num_epochs = 5
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    # After training: video retrieval with the exported encoder, configs/retrieval.py:demo
    # (test-split queries, train-split gallery); 'none' switches it off.
    config.eval_retrieval = "demo"
  else:
    raise ValueError(f"Unknown preset {preset!r}; choose from '', 'tsm50', 'demo'.")
  return config
