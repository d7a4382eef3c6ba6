"""Video lists -> sharded DMVR-format TFRecords, in parallel processes, resumable.

Layout written into `output_dir`:
  {prefix}-{i:05d}-of-{n:05d}.tfrecord   the shards; one shard set per split, the prefix
                                          is the split name unless given.
  label_map.txt                          sorted class names (line number = label index).
  manifest.json                          videos per split and class, frames, per-shard
                                          counts and every input that failed, with why.
  .convert_status/{shard}.json           what each finished shard holds; lets a rerun
                                          skip it (resume) and detect changed inputs.

Each shard is written under a temporary name and renamed when complete, so a killed run
leaves only whole shards behind and the same command resumes where it stopped. Videos
are assigned to shards deterministically (a fixed-seed shuffle of the sorted list, then
round robin), so shards mix classes and a rerun rebuilds identical shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from typing import Callable, Sequence, TextIO

import numpy as np
import tensorflow as tf

from tcvm_jax.data import dmvr_format
from tcvm_jax.data import video_decode
from tcvm_jax.data.dataset_lists import UNUSED_SPLIT, DatasetList, VideoRecord

MANIFEST_FILENAME = "manifest.json"
STATUS_DIRNAME = ".convert_status"
VIDEOS_PER_SHARD = 250   # target shard size when --num_shards is not given.
_ASSIGNMENT_SEED = 0     # fixed: shard assignment must not change between runs.
_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")
UNLABELLED = "(unlabelled)"  # videos_per_class key for records without a label.


class ConversionError(ValueError):
  """Bad arguments or an output folder that holds a different conversion."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  fps: float | None = None        # resample to this rate; None keeps the source rate.
  short_side: int = 128           # resize short side to this (even); <= 0 keeps size.
  jpeg_quality: int = 90          # 1..100.
  num_workers: int = 1            # processes; 1 converts in this process.
  overwrite: bool = False         # replace shards/label map left by another conversion.
  filename_root: str | None = None  # `video/filename` is stored relative to this.
  progress_every_s: float = 10.0  # seconds between progress lines.

  def validate(self) -> None:
    if self.fps is not None and not self.fps > 0:
      raise ConversionError(f"fps must be > 0 (or unset to keep the source), got {self.fps}")
    if self.short_side > 0 and self.short_side % 2:
      raise ConversionError(f"short_side must be even (or <= 0 to keep), got {self.short_side}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ConversionError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
    if self.num_workers < 1:
      raise ConversionError(f"num_workers must be >= 1, got {self.num_workers}")

  def encoding(self) -> dict:
    """The settings that change shard contents (part of each shard's fingerprint)."""
    return {"fps": self.fps, "short_side": self.short_side, "jpeg_quality": self.jpeg_quality}


@dataclasses.dataclass(frozen=True)
class ShardTask:
  output_dir: str
  prefix: str
  split: str
  shard_index: int
  num_shards: int
  records: tuple[VideoRecord, ...]
  label_indices: tuple[int | None, ...]  # -1 unlabelled, None: label not in the map.
  filenames: tuple[str, ...]             # what `video/filename` stores per record.
  options: ConvertOptions
  fingerprint: str

  @property
  def filename(self) -> str:
    return shard_filename(self.prefix, self.shard_index, self.num_shards)


def shard_filename(prefix: str, index: int, num_shards: int) -> str:
  return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def default_num_shards(num_videos: int) -> int:
  return max(1, math.ceil(num_videos / VIDEOS_PER_SHARD))


def _record_key(record: VideoRecord) -> tuple:
  return (record.path, record.start_seconds or 0.0, record.end_seconds or -1.0,
          record.label, record.split)


def assign_to_shards(records: Sequence[VideoRecord], num_shards: int) -> list[list[VideoRecord]]:
  """Deterministic: sorted, shuffled with a fixed seed, dealt round robin.

  Independent of the input order, so the same list always gives the same shards.
  """
  if num_shards < 1:
    raise ConversionError(f"num_shards must be >= 1, got {num_shards}")
  ordered = sorted(records, key=_record_key)
  order = np.random.default_rng(_ASSIGNMENT_SEED).permutation(len(ordered))
  shards: list[list[VideoRecord]] = [[] for _ in range(num_shards)]
  for position, record_index in enumerate(order):
    shards[position % num_shards].append(ordered[record_index])
  return shards


# --- One shard (runs in a worker process) -----------------------------------------

_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
  global _PROGRESS_QUEUE
  _PROGRESS_QUEUE = queue


def _status_path(output_dir: str, filename: str) -> str:
  return os.path.join(output_dir, STATUS_DIRNAME, filename + ".json")


def _write_json_atomically(path: str, data: dict) -> None:
  temporary = path + ".incomplete"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def convert_shard(task: ShardTask, on_video: Callable[[], None] | None = None) -> dict:
  """Writes one shard; returns its status (counts and failures). Never fails per video."""
  if on_video is None and _PROGRESS_QUEUE is not None:
    on_video = lambda: _PROGRESS_QUEUE.put(1)
  final_path = os.path.join(task.output_dir, task.filename)
  temporary_path = os.path.join(task.output_dir, f".{task.filename}.incomplete")
  class_counts: collections.Counter[str] = collections.Counter()
  failures, num_videos, num_frames = [], 0, 0
  decode_threads = 1 if task.options.num_workers > 1 else 0
  with tf.io.TFRecordWriter(temporary_path) as writer:
    for record, label_index, filename in zip(task.records, task.label_indices, task.filenames):
      try:
        if label_index is None:
          raise video_decode.VideoDecodeError(f"label {record.label!r} is not in the label map")
        clip = video_decode.ClipInfo()
        # Frames are JPEG-encoded as they are decoded: long videos never sit in memory.
        jpegs = [video_decode.encode_jpeg(frame, task.options.jpeg_quality)
                 for _, frame in video_decode.iter_video_frames(
                     record.path, record.start_seconds, record.end_seconds,
                     fps=task.options.fps, short_side=task.options.short_side,
                     decode_threads=decode_threads, info=clip)]
        example = dmvr_format.make_sequence_example(
            jpegs, label_index, record.label, filename, clip.start_seconds, clip.end_seconds)
        writer.write(example.SerializeToString(deterministic=True))
        num_videos += 1
        num_frames += len(jpegs)
        class_counts[record.label or UNLABELLED] += 1
      except Exception as error:  # pylint: disable=broad-except
        # One bad video must never stop the conversion; it is reported instead.
        reason = (str(error) if isinstance(error, video_decode.VideoDecodeError)
                  else f"{type(error).__name__}: {error}")
        failures.append({"path": record.path, "label": record.label, "split": record.split,
                         "reason": reason or type(error).__name__})
      if on_video is not None:
        on_video()
  with open(temporary_path, "rb") as f:
    os.fsync(f.fileno())
  status = {
      "file": task.filename, "split": task.split, "fingerprint": task.fingerprint,
      "num_videos": num_videos, "num_frames": num_frames, "num_failed": len(failures),
      "videos_per_class": dict(sorted(class_counts.items())), "failures": failures,
  }
  # Status first, then the shard: a shard file on disk always has its status.
  _write_json_atomically(_status_path(task.output_dir, task.filename), status)
  os.replace(temporary_path, final_path)
  return status


# --- Planning ------------------------------------------------------------------------

def _fingerprint(prefix: str, index: int, num_shards: int, records, label_indices,
                 filenames, options: ConvertOptions) -> str:
  payload = json.dumps({
      "shard": [prefix, index, num_shards], "encoding": options.encoding(),
      "records": [dataclasses.astuple(r) for r in records],
      "label_indices": list(label_indices), "filenames": list(filenames),
  }, sort_keys=True)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _stored_filename(path: str, root: str | None) -> str:
  if root:
    relative = os.path.relpath(path, root)
    if not relative.startswith(".."):
      return relative
  return path


def _prepare_label_map(output_dir: str, class_names: Sequence[str], overwrite: bool) -> list[str]:
  """Writes the sorted label map, or reuses an existing one that covers every class."""
  wanted = sorted(set(class_names))
  if os.path.exists(os.path.join(output_dir, dmvr_format.LABEL_MAP_FILENAME)):
    existing = dmvr_format.read_label_map(output_dir)
    if set(wanted) <= set(existing):
      return existing  # keeps indices of shards already written with it valid.
    if not overwrite:
      missing = sorted(set(wanted) - set(existing))
      raise ConversionError(
          f"{output_dir}/{dmvr_format.LABEL_MAP_FILENAME} exists and lacks {len(missing)} "
          f"classes of this input (e.g. {missing[:3]}); shards written with it would get "
          "wrong indices. Use a new --output_dir, or --overwrite to rewrite it (existing "
          "shards are then rewritten when their conversion is rerun).")
  return dmvr_format.write_label_map(output_dir, wanted)


def _clear_other_shard_sets(output_dir: str, prefix: str, num_shards: int, overwrite: bool) -> None:
  """Refuses (or with overwrite removes) shards of this prefix with another shard count."""
  pattern = re.compile(rf"^{re.escape(prefix)}-\d{{5}}-of-(\d{{5}})\.tfrecord$")
  stale = sorted(name for name in os.listdir(output_dir)
                 if (m := pattern.match(name)) and int(m.group(1)) != num_shards)
  if not stale:
    return
  if not overwrite:
    raise ConversionError(
        f"{output_dir} holds {len(stale)} '{prefix}' shards of another conversion "
        f"(e.g. {stale[0]}, this run writes {num_shards} shards). A glob would mix them: "
        "use a new --output_dir or --shard_prefix, or --overwrite to delete them.")
  for name in stale:
    os.remove(os.path.join(output_dir, name))
    status = _status_path(output_dir, name)
    if os.path.exists(status):
      os.remove(status)


def _plan_shards(output_dir, prefix, split, records, label_index, num_shards, options):
  """(tasks to run, statuses of shards already complete)."""
  _clear_other_shard_sets(output_dir, prefix, num_shards, options.overwrite)
  tasks, finished = [], []
  for index, shard_records in enumerate(assign_to_shards(records, num_shards)):
    label_indices = tuple(-1 if not r.label else label_index.get(r.label)
                          for r in shard_records)
    filenames = tuple(_stored_filename(r.path, options.filename_root) for r in shard_records)
    fingerprint = _fingerprint(prefix, index, num_shards, shard_records, label_indices,
                               filenames, options)
    task = ShardTask(output_dir, prefix, split, index, num_shards, tuple(shard_records),
                     label_indices, filenames, options, fingerprint)
    final_path = os.path.join(output_dir, task.filename)
    status_path = _status_path(output_dir, task.filename)
    if os.path.exists(final_path):
      status = None
      if os.path.exists(status_path):
        with open(status_path, encoding="utf-8") as f:
          status = json.load(f)
      if status is not None and status.get("fingerprint") == fingerprint:
        finished.append(status)  # resume: this shard is done.
        continue
      if not options.overwrite:
        why = ("has no status record" if status is None
               else "was written from other videos or settings")
        raise ConversionError(
            f"{final_path} exists but {why}. Use a new --output_dir, or --overwrite to "
            "rewrite it.")
    tasks.append(task)
  return tasks, finished


# --- Running ------------------------------------------------------------------------

def format_progress(shards_done: int, num_shards: int, videos_done: int, num_videos: int,
                    elapsed_s: float) -> str:
  """`[shard 3/16] 120/500 videos, 12.3 videos/s, ETA 0:00:31`."""
  rate = videos_done / elapsed_s if elapsed_s > 0 else 0.0
  if rate > 0:
    eta = str(datetime.timedelta(seconds=round((num_videos - videos_done) / rate)))
  else:
    eta = "?"
  return (f"[shard {shards_done}/{num_shards}] {videos_done}/{num_videos} videos, "
          f"{rate:.1f} videos/s, ETA {eta}")


def _failed_shard_status(task: ShardTask, error: BaseException) -> dict:
  """Every video of a shard whose worker died: reported, and the shard left unwritten."""
  reason = f"shard not written ({type(error).__name__}: {error}); rerun to resume"
  return {
      "file": task.filename, "split": task.split, "fingerprint": task.fingerprint,
      "num_videos": 0, "num_frames": 0, "num_failed": len(task.records),
      "videos_per_class": {}, "incomplete": True,
      "failures": [{"path": r.path, "label": r.label, "split": r.split, "reason": reason}
                   for r in task.records],
  }


def _run_tasks(tasks: Sequence[ShardTask], num_shards_total: int, num_finished: int,
               options: ConvertOptions, log: TextIO) -> list[dict]:
  total_videos = sum(len(t.records) for t in tasks)
  started = time.monotonic()
  state = {"videos": 0, "shards": num_finished, "printed": started}

  def report(force: bool = False) -> None:
    now = time.monotonic()
    if force or now - state["printed"] >= options.progress_every_s:
      state["printed"] = now
      print(format_progress(state["shards"], num_shards_total, state["videos"], total_videos,
                            now - started), file=log, flush=True)

  def on_video() -> None:
    state["videos"] += 1
    report()

  results = []
  if options.num_workers == 1 or len(tasks) <= 1:
    for task in tasks:
      results.append(convert_shard(task, on_video))
      state["shards"] += 1
      report(force=True)
    return results

  context = multiprocessing.get_context("spawn")  # fork after TF import is unsafe.
  queue = context.Queue()
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=min(options.num_workers, len(tasks)), mp_context=context,
      initializer=_init_worker, initargs=(queue,)) as pool:
    futures = {pool.submit(convert_shard, task): task for task in tasks}
    pending = set(futures)
    while pending:
      done, pending = concurrent.futures.wait(
          pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
      while not queue.empty():
        try:
          state["videos"] += queue.get_nowait()
        except Exception:  # pylint: disable=broad-except
          break
      for future in done:
        try:
          results.append(future.result())
        except Exception as error:  # pylint: disable=broad-except
          results.append(_failed_shard_status(futures[future], error))
        state["shards"] += 1
        report(force=True)
      report()
  return results


# --- Manifest --------------------------------------------------------------------------

def _shard_set_summary(split: str, num_shards: int, statuses: Sequence[dict],
                       options: ConvertOptions) -> dict:
  statuses = sorted(statuses, key=lambda s: s["file"])
  per_class: collections.Counter[str] = collections.Counter()
  for status in statuses:
    per_class.update(status["videos_per_class"])
  return {
      "split": split, "num_shards": num_shards,
      "num_videos": sum(s["num_videos"] for s in statuses),
      "num_frames": sum(s["num_frames"] for s in statuses),
      "num_failed": sum(s["num_failed"] for s in statuses),
      "videos_per_class": dict(sorted(per_class.items())),
      "encoding": options.encoding(),
      "shards": [{"file": s["file"], "num_videos": s["num_videos"],
                  "num_frames": s["num_frames"], "num_failed": s["num_failed"],
                  **({"incomplete": True} if s.get("incomplete") else {})}
                 for s in statuses],
      "failures": [failure for s in statuses for failure in s["failures"]],
  }


def _build_manifest(output_dir: str, shard_sets: dict[str, dict], label_map: Sequence[str],
                    excluded: dict[str, int]) -> dict:
  """Merges this run's shard sets into the folder's manifest (other prefixes are kept)."""
  path = os.path.join(output_dir, MANIFEST_FILENAME)
  merged_sets, merged_excluded = {}, {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    merged_sets = previous.get("shard_sets", {})
    merged_excluded = previous.get("excluded_splits", {})
  merged_sets.update(shard_sets)
  merged_excluded.update(excluded)
  splits: dict[str, dict] = {}
  for shard_set in merged_sets.values():
    split = splits.setdefault(shard_set["split"], {
        "num_videos": 0, "num_frames": 0, "num_failed": 0, "videos_per_class": {}})
    for key in ("num_videos", "num_frames", "num_failed"):
      split[key] += shard_set[key]
    counts = collections.Counter(split["videos_per_class"])
    counts.update(shard_set["videos_per_class"])
    split["videos_per_class"] = dict(sorted(counts.items()))
  return {
      "format": "dmvr-sequence-example",
      "label_map": dmvr_format.LABEL_MAP_FILENAME,
      "num_classes": len(label_map),
      "splits": splits,
      "shard_sets": merged_sets,
      "excluded_splits": merged_excluded,
      "num_videos": sum(s["num_videos"] for s in splits.values()),
      "num_frames": sum(s["num_frames"] for s in splits.values()),
      "num_failed": sum(s["num_failed"] for s in splits.values()),
  }


# --- Entry point ---------------------------------------------------------------------

def convert_dataset(
    dataset: DatasetList,
    output_dir: str,
    splits: Sequence[str] | None = None,
    shard_prefix: str | None = None,
    num_shards: int = 0,
    options: ConvertOptions = ConvertOptions(),
    log: TextIO = sys.stderr,
) -> dict:
  """Converts the chosen splits of `dataset`; returns this run's manifest view.

  Args:
    dataset: records and the dataset's class list (from `dataset_lists`).
    output_dir: where shards, label map and manifest go (created if needed).
    splits: split names to convert; None converts all but HMDB51's "unused".
    shard_prefix: shard file prefix; default: the split name. Only with a single split.
    num_shards: shards per split; 0 picks ceil(videos / VIDEOS_PER_SHARD).
    options: encoding, parallelism and overwrite settings.
    log: where progress lines go.

  Returns:
    The manifest written to `output_dir/manifest.json`, plus "run": what this run did
    (shards converted and skipped, videos, failures).
  """
  options.validate()
  if num_shards < 0:
    raise ConversionError(f"num_shards must be >= 0 (0 = automatic), got {num_shards}")
  available = collections.Counter(r.split for r in dataset.records)
  if not available:
    raise ConversionError("the input list has no videos")
  if splits is None:
    chosen = sorted(s for s in available if s != UNUSED_SPLIT)
  else:
    chosen = list(dict.fromkeys(splits))
    unknown = [s for s in chosen if s not in available]
    if unknown:
      raise ConversionError(f"split(s) {unknown} not in the input; it has {sorted(available)}")
  if not chosen:
    raise ConversionError(f"no split to convert; the input has {sorted(available)}")
  if shard_prefix is not None and len(chosen) > 1:
    raise ConversionError(
        f"--shard_prefix names one shard set but {len(chosen)} splits are selected "
        f"({chosen}); pick one with --split, or leave the prefix to default to split names.")
  prefixes = {split: shard_prefix or split for split in chosen}
  for prefix in prefixes.values():
    if not _PREFIX_PATTERN.match(prefix):
      raise ConversionError(f"shard prefix must match [A-Za-z0-9_.]+, got {prefix!r}")
  excluded = {s: n for s, n in available.items() if s not in chosen}

  os.makedirs(os.path.join(output_dir, STATUS_DIRNAME), exist_ok=True)
  class_names = dataset.class_names or sorted({r.label for r in dataset.records if r.label})
  label_map = _prepare_label_map(output_dir, class_names, options.overwrite)
  label_index = {name: i for i, name in enumerate(label_map)}

  tasks, finished = [], {}
  set_sizes = {}
  for split in chosen:
    records = [r for r in dataset.records if r.split == split]
    count = num_shards or default_num_shards(len(records))
    if count > len(records):
      raise ConversionError(
          f"num_shards ({count}) must not exceed the {len(records)} videos of split "
          f"{split!r} (empty shards)")
    set_sizes[split] = count
    split_tasks, split_finished = _plan_shards(
        output_dir, prefixes[split], split, records, label_index, count, options)
    tasks += split_tasks
    finished[split] = split_finished

  num_shards_total = sum(set_sizes.values())
  num_skipped = sum(len(v) for v in finished.values())
  if num_skipped:
    print(f"Resuming: {num_skipped} of {num_shards_total} shards are complete and kept.",
          file=log, flush=True)
  results = _run_tasks(tasks, num_shards_total, num_skipped, options, log)

  shard_sets = {}
  for split in chosen:
    statuses = finished[split] + [r for r in results if r["split"] == split]
    shard_sets[prefixes[split]] = _shard_set_summary(split, set_sizes[split], statuses, options)
  manifest = _build_manifest(output_dir, shard_sets, label_map, excluded)
  _write_json_atomically(os.path.join(output_dir, MANIFEST_FILENAME), manifest)
  run = {
      "shard_sets": sorted(shard_sets),
      "shards_converted": [r["file"] for r in results if not r.get("incomplete")],
      "shards_skipped": sorted(s["file"] for v in finished.values() for s in v),
      "shards_incomplete": [r["file"] for r in results if r.get("incomplete")],
      "num_videos": sum(s["num_videos"] for s in shard_sets.values()),
      "num_frames": sum(s["num_frames"] for s in shard_sets.values()),
      "num_failed": sum(s["num_failed"] for s in shard_sets.values()),
      "failures": [f for s in shard_sets.values() for f in s["failures"]],
      "excluded_splits": excluded,
  }
  return {**manifest, "run": run}


def format_summary(result: dict, output_dir: str, max_failures: int = 20) -> str:
  """Human-readable end-of-run summary of `convert_dataset`'s result."""
  run = result["run"]
  total = run["num_videos"] + run["num_failed"]
  lines = [f"Converted {run['num_videos']}/{total} videos ({run['num_frames']} frames) "
           f"into {output_dir}: {len(run['shards_converted'])} shards written, "
           f"{len(run['shards_skipped'])} kept from an earlier run."]
  for prefix in run["shard_sets"]:
    shard_set = result["shard_sets"][prefix]
    lines.append(f"  {prefix}: split {shard_set['split']!r}, {shard_set['num_videos']} videos, "
                 f"{shard_set['num_frames']} frames, {len(shard_set['videos_per_class'])} "
                 f"classes, {shard_set['num_shards']} shards, {shard_set['num_failed']} failed")
  for split, count in sorted(run["excluded_splits"].items()):
    lines.append(f"  not converted: {count} videos of split {split!r} (use --split to add)")
  if run["shards_incomplete"]:
    lines.append(f"  {len(run['shards_incomplete'])} shards could not be written; rerun the "
                 "same command to resume.")
  if run["failures"]:
    lines.append(f"Failed videos ({run['num_failed']}; all listed in "
                 f"{os.path.join(output_dir, MANIFEST_FILENAME)}):")
    for failure in run["failures"][:max_failures]:
      lines.append(f"  {failure['path']}: {failure['reason']}")
    if len(run["failures"]) > max_failures:
      lines.append(f"  ... and {len(run['failures']) - max_failures} more")
  return "\n".join(lines)
