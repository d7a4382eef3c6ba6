"""DMVR's on-disk format: one `tf.train.SequenceExample` per video.

Layout (as DMVR's generators write it, so DMVR datasets load as they are):
  feature_lists["image/encoded"]   one bytes feature per frame, a JPEG each.
  context["clip/label/index"]      int64 class index.
  context["clip/label/text"]       bytes class name.
  context["video/filename"]        bytes source file name.
  context["clip/start/timestamp"]  int64 start of the clip in microseconds.
  context["clip/end/timestamp"]    int64 end of the clip in microseconds.

The label map (class names, sorted) is written beside the shards as `label_map.txt`,
one name per line, line number = class index. DMVR's own generator builds it from an
unordered set, so its order can change between runs; ours is sorted and stable.
"""

from __future__ import annotations

import os
from typing import Sequence

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_INDEX_KEY = "clip/label/index"
LABEL_TEXT_KEY = "clip/label/text"
FILENAME_KEY = "video/filename"
START_TIMESTAMP_KEY = "clip/start/timestamp"
END_TIMESTAMP_KEY = "clip/end/timestamp"
LABEL_MAP_FILENAME = "label_map.txt"

CONTEXT_FEATURES = {
    LABEL_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    LABEL_TEXT_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    START_TIMESTAMP_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    END_TIMESTAMP_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}
SEQUENCE_FEATURES = {IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string)}


def make_sequence_example(
    jpeg_frames: Sequence[bytes],
    label_index: int,
    label_text: str,
    filename: str,
    start_seconds: float = 0.0,
    end_seconds: float = 0.0,
) -> tf.train.SequenceExample:
  """Builds one DMVR record from already JPEG-encoded frames."""
  example = tf.train.SequenceExample()
  context = example.context.feature
  context[LABEL_INDEX_KEY].int64_list.value.append(int(label_index))
  context[LABEL_TEXT_KEY].bytes_list.value.append(label_text.encode("utf-8"))
  context[FILENAME_KEY].bytes_list.value.append(filename.encode("utf-8"))
  context[START_TIMESTAMP_KEY].int64_list.value.append(int(round(start_seconds * 1e6)))
  context[END_TIMESTAMP_KEY].int64_list.value.append(int(round(end_seconds * 1e6)))
  frames = example.feature_lists.feature_list[IMAGE_KEY]
  for jpeg in jpeg_frames:
    frames.feature.add().bytes_list.value.append(jpeg)  # one feature per frame
  return example


def parse_sequence_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses one serialized record into a flat dict of tensors (frames stay JPEG bytes)."""
  context, sequence = tf.io.parse_single_sequence_example(
      serialized, context_features=CONTEXT_FEATURES, sequence_features=SEQUENCE_FEATURES)
  return {**context, IMAGE_KEY: sequence[IMAGE_KEY]}


def write_label_map(output_dir: str, class_names: Sequence[str]) -> list[str]:
  """Writes the sorted, de-duplicated label map beside the shards; returns it."""
  names = sorted(set(class_names))
  with open(os.path.join(output_dir, LABEL_MAP_FILENAME), "w", encoding="utf-8") as f:
    f.write("".join(name + "\n" for name in names))
  return names


def read_label_map(directory: str) -> list[str]:
  with open(os.path.join(directory, LABEL_MAP_FILENAME), encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]
