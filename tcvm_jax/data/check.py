"""Validates DMVR-format TFRecords and summarises them.

Per record: it parses as a `tf.train.SequenceExample`; the context keys are present with
the right type and one value each; `image/encoded` is a feature list with exactly one
bytes value per frame and at least one frame; the JPEGs decode (all, a sample, or none)
to frames of one size; the label index is inside the label map and its text matches
the map (index -1 with empty text = unlabelled, allowed). Per file: the TFRecord framing
is intact, and the record count matches `manifest.json` when one lists the file.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Sequence

import tensorflow as tf
from google.protobuf import message as protobuf_message

from tcvm_jax.data import dmvr_format

JPEG_CHECKS = ("all", "sample", "none")
# (key, protobuf list kind) of the context every record must carry.
REQUIRED_CONTEXT = (
    (dmvr_format.LABEL_INDEX_KEY, "int64_list"),
    (dmvr_format.LABEL_TEXT_KEY, "bytes_list"),
    (dmvr_format.FILENAME_KEY, "bytes_list"),
    (dmvr_format.START_TIMESTAMP_KEY, "int64_list"),
    (dmvr_format.END_TIMESTAMP_KEY, "int64_list"),
)


@dataclasses.dataclass(frozen=True)
class Problem:
  file: str
  record_index: int | None  # None: the problem concerns the whole file.
  message: str

  def __str__(self) -> str:
    where = self.file if self.record_index is None else f"{self.file} record {self.record_index}"
    return f"{where}: {self.message}"


@dataclasses.dataclass
class CheckReport:
  files: list[str]
  label_map: list[str] | None
  num_records: int = 0
  num_frames: int = 0
  num_jpegs_decoded: int = 0
  num_unlabelled: int = 0
  records_per_class: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  records_per_file: dict[str, int] = dataclasses.field(default_factory=dict)
  frame_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  problems: list[Problem] = dataclasses.field(default_factory=list)
  truncated: bool = False  # stopped at max_records.

  @property
  def ok(self) -> bool:
    return not self.problems

  def problem_records(self) -> set[tuple[str, int | None]]:
    return {(p.file, p.record_index) for p in self.problems}


def find_tfrecords(input_path: str) -> list[str]:
  """A folder (its shards), a glob, or one file -> sorted shard paths."""
  if os.path.isdir(input_path):
    names = sorted(n for n in os.listdir(input_path) if not n.startswith(".")
                   and (".tfrecord" in n or "-of-" in n) and not n.endswith((".json", ".txt")))
    return [os.path.join(input_path, n) for n in names]
  if any(c in input_path for c in "*?["):
    return sorted(glob.glob(input_path))
  return [input_path] if os.path.exists(input_path) else []


def _check_context(context, file: str, index: int) -> list[Problem]:
  problems = []
  for key, kind in REQUIRED_CONTEXT:
    if key not in context.feature:
      problems.append(Problem(file, index, f"missing context key {key!r}"))
      continue
    feature = context.feature[key]
    present = feature.WhichOneof("kind")
    if present != kind:
      problems.append(Problem(file, index, f"context key {key!r} is {present}, expected {kind}"))
    elif len(getattr(feature, kind).value) != 1:
      problems.append(Problem(
          file, index, f"context key {key!r} has {len(getattr(feature, kind).value)} values, "
          "expected 1"))
  return problems


def _single(context, key: str, kind: str):
  if key in context.feature and context.feature[key].WhichOneof("kind") == kind:
    values = getattr(context.feature[key], kind).value
    if len(values) == 1:
      return values[0]
  return None


def _frames_to_decode(num_frames: int, jpeg_check: str) -> list[int]:
  if jpeg_check == "all":
    return list(range(num_frames))
  if jpeg_check == "sample":
    return sorted({0, num_frames // 2, num_frames - 1})
  return []


def check_record(serialized: bytes, file: str, index: int, report: CheckReport,
                 jpeg_check: str, text_by_index: dict[int, tuple[str, int]]) -> None:
  """Checks one serialized record, adding counts and problems to `report`."""
  try:
    example = tf.train.SequenceExample.FromString(serialized)
  except protobuf_message.DecodeError as error:
    report.problems.append(Problem(file, index, f"not a SequenceExample ({error})"))
    return
  problems = _check_context(example.context, file, index)

  # Frames: a feature list with one bytes value per feature (DMVR's layout).
  feature_lists = example.feature_lists.feature_list
  jpegs: list[bytes] = []
  if dmvr_format.IMAGE_KEY not in feature_lists:
    problems.append(Problem(file, index, f"missing feature list {dmvr_format.IMAGE_KEY!r}"))
  else:
    for frame_index, feature in enumerate(feature_lists[dmvr_format.IMAGE_KEY].feature):
      if feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
        count = len(feature.bytes_list.value) if feature.WhichOneof("kind") == "bytes_list" else 0
        problems.append(Problem(
            file, index, f"frame {frame_index}: expected one bytes value per frame feature, "
            f"got {feature.WhichOneof('kind')} with {count} values"))
        break
      jpegs.append(feature.bytes_list.value[0])
    else:
      if not jpegs:
        problems.append(Problem(file, index, "empty video (0 frames)"))
  report.num_frames += len(jpegs)

  sizes = set()
  for frame_index in _frames_to_decode(len(jpegs), jpeg_check):
    try:
      shape = tf.io.decode_jpeg(jpegs[frame_index], channels=3).shape
      sizes.add((int(shape[0]), int(shape[1])))
      report.num_jpegs_decoded += 1
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
      message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      problems.append(Problem(file, index,
                              f"frame {frame_index}: JPEG does not decode ({message})"))
  if len(sizes) > 1:
    problems.append(Problem(file, index, f"frames differ in size: {sorted(sizes)}"))
  elif sizes:
    report.frame_sizes[sizes.pop()] += 1

  # Labels: inside the map, text matching it; or consistent across records without a map.
  label_index = _single(example.context, dmvr_format.LABEL_INDEX_KEY, "int64_list")
  label_bytes = _single(example.context, dmvr_format.LABEL_TEXT_KEY, "bytes_list")
  if label_index is not None:
    label_text = None if label_bytes is None else label_bytes.decode("utf-8", "replace")
    if label_index == -1 and not label_text:
      report.num_unlabelled += 1
    elif report.label_map is not None:
      if not 0 <= label_index < len(report.label_map):
        problems.append(Problem(file, index, f"label index {label_index} outside the label map "
                                f"[0, {len(report.label_map)})"))
      elif label_text is not None and label_text != report.label_map[label_index]:
        problems.append(Problem(file, index, f"label text {label_text!r} does not match label "
                                f"map entry {label_index} {report.label_map[label_index]!r}"))
      else:
        report.records_per_class[report.label_map[label_index]] += 1
    elif label_index < 0:
      problems.append(Problem(file, index, f"negative label index {label_index}"))
    else:
      seen = text_by_index.setdefault(label_index, (label_text, index))
      if seen[0] != label_text:
        problems.append(Problem(file, index, f"label index {label_index} has text {label_text!r} "
                                f"here but {seen[0]!r} in record {seen[1]}"))
      report.records_per_class[label_text if label_text else str(label_index)] += 1
  report.problems.extend(problems)


def _manifest_counts(directory: str) -> dict[str, int]:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    return {shard["file"]: shard["num_videos"]
            for shard_set in manifest.get("shard_sets", {}).values()
            for shard in shard_set.get("shards", []) if not shard.get("incomplete")}
  except (ValueError, KeyError, TypeError):
    return {}


def check_tfrecords(
    files: Sequence[str],
    label_map: Sequence[str] | None = None,
    max_records: int | None = None,
    jpeg_check: str = "all",
) -> CheckReport:
  """Checks `files` (see `find_tfrecords`); returns the structured report.

  Args:
    files: TFRecord shards.
    label_map: class names by index; None: `label_map.txt` beside the first file if
      there is one, else only index/text consistency across records is checked.
    max_records: stop after this many records in total (None: all).
    jpeg_check: decode 'all' frames, a 'sample' (first, middle, last) or 'none'.
  """
  if jpeg_check not in JPEG_CHECKS:
    raise ValueError(f"jpeg_check must be one of {JPEG_CHECKS}, got {jpeg_check!r}")
  if max_records is not None and max_records < 1:
    raise ValueError(f"max_records must be >= 1 (or None for all), got {max_records}")
  files = list(files)
  if label_map is None and files:
    directory = os.path.dirname(files[0])
    if os.path.exists(os.path.join(directory, dmvr_format.LABEL_MAP_FILENAME)):
      label_map = dmvr_format.read_label_map(directory)
  report = CheckReport(files=files, label_map=None if label_map is None else list(label_map))
  text_by_index: dict[int, tuple[str, int]] = {}
  for file in files:
    count = 0
    try:
      for serialized in tf.data.TFRecordDataset(file).as_numpy_iterator():
        if max_records is not None and report.num_records >= max_records:
          report.truncated = True
          break
        check_record(serialized, file, count, report, jpeg_check, text_by_index)
        count += 1
        report.num_records += 1
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.NotFoundError) as error:
      message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      report.problems.append(Problem(
          file, None, f"unreadable after {count} records ({type(error).__name__}: {message})"))
    report.records_per_file[file] = count
    if report.truncated:
      break
    expected = _manifest_counts(os.path.dirname(file)).get(os.path.basename(file))
    if expected is not None and expected != count:
      report.problems.append(Problem(file, None, f"manifest.json lists {expected} records, the "
                                     f"file has {count}"))
  return report


def format_report(report: CheckReport, max_problems: int = 50) -> str:
  """Human-readable summary: counts, per-class records, problems with file and record."""
  lines = [f"Checked {len(report.records_per_file)} of {len(report.files)} files: "
           f"{report.num_records} records, {report.num_frames} frames, "
           f"{report.num_jpegs_decoded} JPEGs decoded"
           + (" (stopped at --max_records)" if report.truncated else "") + "."]
  if report.label_map is not None:
    lines.append(f"Label map: {len(report.label_map)} classes.")
  if report.frame_sizes:
    sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in report.frame_sizes.most_common(5))
    lines.append(f"Frame sizes (records): {sizes}")
  if report.records_per_class:
    lines.append(f"Records per class ({len(report.records_per_class)} classes):")
    for name, count in sorted(report.records_per_class.items()):
      lines.append(f"  {name}: {count}")
  if report.num_unlabelled:
    lines.append(f"Unlabelled records: {report.num_unlabelled}")
  if report.problems:
    lines.append(f"PROBLEMS ({len(report.problems)}):")
    lines += [f"  {p}" for p in report.problems[:max_problems]]
    if len(report.problems) > max_problems:
      lines.append(f"  ... and {len(report.problems) - max_problems} more")
  else:
    lines.append("No problems found.")
  return "\n".join(lines)
