"""UCF101 through tensorflow_datasets, mapped to the pipeline's output dicts.

Works only when the `ucf101` builder's prepared files are already under `data_dir` (this
module never downloads). Its videos are stored as per-frame JPEGs, so frames are read
undecoded (`SkipDecoding`) and only the sampled ones are decoded, exactly as for DMVR
shards. Differences from DMVR shards, documented here because they matter:
  * labels follow tfds' `ucf101_labels.txt` order, not our sorted label map;
  * video_index is a 31-bit hash of the tfds record id (unique in practice: 13k videos);
  * per-process splitting uses `tfds.even_splits`, one part per process.
Not tested against real data here (no downloads); only the missing-data error is tested.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tcvm_jax.data import pipeline

DEFAULT_BUILDER_CONFIG = "ucf101_1_256"  # split 1, frames stored at 256x256


def _builder(data_dir: str | None, builder_config: str):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(f"ucf101/{builder_config}", data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"The tfds 'ucf101/{builder_config}' data is not prepared under data_dir={data_dir!r} "
        f"(looked in {builder.data_dir}). Either prepare it there with tensorflow_datasets, or "
        "convert the UCF101 videos to DMVR shards with `python scripts/make_tfrecords.py "
        "--format=ucf101 --split_file=ucfTrainTestlist --video_root=UCF-101 "
        "--output_dir=data/ucf101` (see data/README.md) and set config.data.train_pattern "
        "to 'data/ucf101/train-*.tfrecord'.")
  return builder


def _source(builder, split: str, process_index: int, process_count: int,
            shuffle_seed: int | None) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  part = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed)
  return builder.as_dataset(split=part, shuffle_files=shuffle_seed is not None,
                            read_config=read_config,
                            decoders={"video": tfds.decode.SkipDecoding()})


def _parse(element):
  frames = element["video"]  # (n,) JPEG bytes
  return {"frames": frames, "label": tf.cast(element["label"], tf.int32),
          "video_index": element["video_index"], "epoch": element["epoch"],
          "reason": tf.where(tf.size(frames) == 0, pipeline.EMPTY, pipeline.OK)}


def _parse_failed(element):
  return {"frames": tf.zeros([0], tf.string), "label": tf.constant(-1, tf.int32),
          "video_index": element["video_index"], "epoch": element["epoch"],
          "reason": tf.constant(pipeline.UNPARSEABLE, tf.int32)}


def _with_index(element, position):
  video_index = tf.strings.to_hash_bucket_fast(element["tfds_id"], 2**31)
  return {"video": element["video"], "label": element["label"], "video_index": video_index,
          "epoch": position}  # `epoch` only keys the per-element randomness


def make_ucf101_dataset(config, split: str = "train", *, data_dir: str | None = None,
                        batch_size_per_process: int, train: bool | None = None,
                        seed: int | None = None, num_clips: int = 1, num_crops: int = 1,
                        process_index: int = 0, process_count: int = 1,
                        builder_config: str = DEFAULT_BUILDER_CONFIG
                        ) -> pipeline.InputIterator:
  """Training (endless, shuffled) or evaluation (all views, masked) UCF101 batches.

  `train` defaults to split == 'train'. Output dicts as in `pipeline.make_*_dataset`.
  """
  train = split == "train" if train is None else train
  if train:
    pipeline.check_train_args(config, batch_size_per_process)
  else:
    pipeline.check_eval_args(config, batch_size_per_process, num_clips, num_crops)
  builder = _builder(data_dir, builder_config)
  seed = config.seed if seed is None else int(seed)
  num_records = builder.info.splits[split].num_examples
  per_process = math.ceil(num_records / process_count)
  name = f"tfds ucf101/{builder_config} {split}"
  tracker = pipeline.BadRecordTracker(name, [name], config.data.max_bad_record_fraction,
                                      per_process)
  parse_fns = {"parse": _parse, "parse_failed": _parse_failed}
  if train:
    source = _source(builder, split, process_index, process_count, seed)
    source = source.repeat().shuffle(config.data.shuffle_buffer, seed=seed)
    records = source.enumerate().map(lambda position, e: _with_index(e, position))
    dataset = pipeline.train_batches(records, config, seed, tracker, batch_size_per_process,
                                     **parse_fns)
    return pipeline.InputIterator(dataset, tracker, per_process, config.data.input_size)
  source = _source(builder, split, process_index, process_count, None)
  records = source.map(lambda e: _with_index(e, tf.constant(0, tf.int64)))
  num_batches = math.ceil(per_process * num_clips * num_crops / batch_size_per_process)
  dataset = pipeline.eval_batches(records, config, num_clips, num_crops, tracker,
                                  batch_size_per_process, num_batches, **parse_fns)
  return pipeline.InputIterator(dataset, tracker, per_process, config.data.input_size,
                                num_batches)


def is_available(data_dir: str | None = None,
                 builder_config: str = DEFAULT_BUILDER_CONFIG) -> bool:
  try:
    _builder(data_dir, builder_config)
  except FileNotFoundError:
    return False
  return True

