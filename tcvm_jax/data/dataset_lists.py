"""Readers for the video lists the converter accepts: a generic CSV and official layouts.

Every reader returns `VideoRecord`s (video path, label text, split, optional clip
start/end in seconds); `load_dataset_list` also returns the dataset's full class list
(the official one where the dataset ships it), from which the label map is written.

Formats:
  csv          `path,label[,start,end]` rows. A header row naming the columns (`path` or
               `video_path`, `label`, `start`, `end`, `split`; DMVR's CSVs have one) is
               used when present. Relative paths are resolved against `video_root`, or
               the CSV's own folder when no root is given. An empty label = unlabelled.
  kinetics400  the official CSVs `label,youtube_id,time_start,time_end,split[,is_cc]`
               (the test CSV has no label column). Videos are looked up anywhere under
               `video_root` as `{youtube_id}_{start:06d}_{end:06d}.*` (trimmed clips, as
               common K400 downloads name them) or `{youtube_id}.*` (a full video, which
               is then trimmed to the CSV's times).
  ssv2         `labels.json` (name -> index) beside `train.json` / `validation.json` /
               `test.json` (lists of {id, template, label, placeholders}); the label is
               the template with the brackets removed; videos are `{video_root}/{id}.webm`.
  ucf101       `classInd.txt` ("1 ApplyEyeMakeup") with `trainlist0N.txt`
               ("ApplyEyeMakeup/v_..._c01.avi 1") and `testlist0N.txt` (no index; the class
               is the folder); videos are `{video_root}/{Class}/{name}.avi`.
  hmdb51       split files `{class}_test_split{N}.txt` ("name.avi 1"): 1 = train,
               2 = test, 0 = not in this fold (split "unused"); videos are
               `{video_root}/{class}/{name}.avi`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from typing import Sequence

FORMATS = ("csv", "kinetics400", "ssv2", "ucf101", "hmdb51")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")
UNUSED_SPLIT = "unused"  # HMDB51 videos that a fold leaves out.


@dataclasses.dataclass(frozen=True)
class VideoRecord:
  path: str
  label: str = ""                      # class name; "" means unlabelled.
  split: str = "train"
  start_seconds: float | None = None   # None: from the beginning.
  end_seconds: float | None = None     # None: to the end.


@dataclasses.dataclass(frozen=True)
class DatasetList:
  records: list[VideoRecord]
  class_names: list[str]  # every class of the dataset (label map source), unsorted.


class DatasetListError(ValueError):
  """A list file is malformed; the message names the file and line."""


def _resolve(path: str, root: str) -> str:
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def _parse_seconds(text: str, what: str, where: str) -> float | None:
  text = text.strip()
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    raise DatasetListError(f"{where}: {what} must be a number of seconds, got {text!r}")
  if value < 0:
    raise DatasetListError(f"{where}: {what} must be >= 0 seconds, got {value}")
  return value


def _check_clip(start: float | None, end: float | None, where: str) -> None:
  if start is not None and end is not None and end <= start:
    raise DatasetListError(f"{where}: end ({end}) must be greater than start ({start})")


# --- Generic CSV --------------------------------------------------------------

_CSV_COLUMNS = {
    "path": ("path", "video_path", "video", "filename", "file"),
    "label": ("label", "label_name", "class", "label_text"),
    "start": ("start", "start_sec", "start_seconds", "time_start"),
    "end": ("end", "end_sec", "end_seconds", "time_end"),
    "split": ("split", "subset"),
}


def read_csv_list(csv_path: str, video_root: str | None = None,
                  split: str = "train") -> list[VideoRecord]:
  """`path,label[,start,end]` rows (header optional) -> records of split `split`."""
  root = video_root or os.path.dirname(os.path.abspath(csv_path))
  with open(csv_path, newline="", encoding="utf-8") as f:
    rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
  if not rows:
    return []
  header = [cell.strip().lower() for cell in rows[0]]
  looks_like_header = (any(cell in _CSV_COLUMNS["path"] for cell in header) and not any(
      os.path.splitext(cell)[1] in VIDEO_EXTENSIONS for cell in header))
  columns: dict[str, int] = {}
  if looks_like_header:
    for name, aliases in _CSV_COLUMNS.items():
      matches = [i for i, cell in enumerate(header) if cell in aliases]
      if matches:
        columns[name] = matches[0]
    rows = rows[1:]
    first_line = 2
  else:
    columns = {"path": 0, "label": 1, "start": 2, "end": 3}
    first_line = 1
  records = []
  for line, row in enumerate(rows, start=first_line):
    where = f"{csv_path}:{line}"
    if not looks_like_header and len(row) > 4:
      raise DatasetListError(f"{where}: expected path,label[,start,end], got {len(row)} columns")
    cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
    path = cells["path"]
    if not path:
      raise DatasetListError(f"{where}: empty path")
    start = _parse_seconds(cells.get("start", ""), "start", where)
    end = _parse_seconds(cells.get("end", ""), "end", where)
    _check_clip(start, end, where)
    records.append(VideoRecord(
        path=_resolve(path, root), label=cells.get("label", ""),
        split=cells.get("split") or split, start_seconds=start, end_seconds=end))
  return records


# --- Kinetics-400 ---------------------------------------------------------------

def index_videos(video_root: str) -> dict[str, list[str]]:
  """File stem -> every video file under `video_root` with that stem (sorted)."""
  index: dict[str, list[str]] = {}
  for folder, _, files in os.walk(video_root):
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        index.setdefault(stem, []).append(os.path.join(folder, name))
  for paths in index.values():
    paths.sort()
  return index


def kinetics_clip_stem(youtube_id: str, start: float, end: float) -> str:
  return f"{youtube_id}_{int(round(start)):06d}_{int(round(end)):06d}"


def _pick_candidate(paths: Sequence[str], label: str, split: str) -> str:
  """Prefers a file in a folder named after the label, then one under the split folder."""
  label_dirs = {label, label.replace(" ", "_")}
  for path in paths:
    if os.path.basename(os.path.dirname(path)) in label_dirs:
      return path
  for path in paths:
    if split and f"{os.sep}{split}{os.sep}" in path:
      return path
  return paths[0]


_KINETICS_SPLITS = {"validate": "val", "valid": "val", "validation": "val"}


def read_kinetics400_csv(csv_path: str, video_root: str,
                         index: dict[str, list[str]] | None = None) -> list[VideoRecord]:
  """Official K400 CSV -> records; trimmed clip files are used whole, full videos trimmed."""
  if index is None:
    index = index_videos(video_root)
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    fields = set(reader.fieldnames or ())
    missing = {"youtube_id", "time_start", "time_end"} - fields
    if missing:
      raise DatasetListError(
          f"{csv_path}: not a Kinetics CSV, missing columns {sorted(missing)} "
          "(expected label,youtube_id,time_start,time_end,split)")
    records = []
    for line, row in enumerate(reader, start=2):
      where = f"{csv_path}:{line}"
      youtube_id = row["youtube_id"].strip()
      start = _parse_seconds(row["time_start"], "time_start", where)
      end = _parse_seconds(row["time_end"], "time_end", where)
      if start is None or end is None:
        raise DatasetListError(f"{where}: time_start and time_end are required")
      _check_clip(start, end, where)
      label = (row.get("label") or "").strip()
      split = (row.get("split") or "").strip() or os.path.splitext(os.path.basename(csv_path))[0]
      split = _KINETICS_SPLITS.get(split, split)
      stem = kinetics_clip_stem(youtube_id, start, end)
      if stem in index:  # already trimmed to [start, end]: use the whole file.
        records.append(VideoRecord(_pick_candidate(index[stem], label, split), label, split))
      elif youtube_id in index:  # the full YouTube video: trim it here.
        records.append(VideoRecord(_pick_candidate(index[youtube_id], label, split), label,
                                   split, start, end))
      else:  # reported as missing by the converter, not dropped here.
        records.append(VideoRecord(os.path.join(video_root, stem + ".mp4"), label, split))
  return records


# --- Something-Something v2 -------------------------------------------------------

def read_ssv2_labels(labels_json: str) -> dict[str, int]:
  with open(labels_json, encoding="utf-8") as f:
    labels = json.load(f)
  if not isinstance(labels, dict):
    raise DatasetListError(f"{labels_json}: expected a JSON object name -> index")
  return {name: int(index) for name, index in labels.items()}


def ssv2_label_from_template(template: str) -> str:
  return template.replace("[", "").replace("]", "")


_SSV2_SPLITS = {"something-something-v2-train": "train",
                "something-something-v2-validation": "validation",
                "something-something-v2-test": "test"}


def read_ssv2_split(split_json: str, video_root: str) -> list[VideoRecord]:
  """`train.json` / `validation.json` / `test.json` -> records (test ones unlabelled)."""
  stem = os.path.splitext(os.path.basename(split_json))[0]
  split = _SSV2_SPLITS.get(stem, stem)
  with open(split_json, encoding="utf-8") as f:
    entries = json.load(f)
  if not isinstance(entries, list):
    raise DatasetListError(f"{split_json}: expected a JSON list of {{id, template, ...}}")
  records = []
  for number, entry in enumerate(entries):
    if not isinstance(entry, dict) or "id" not in entry:
      raise DatasetListError(f"{split_json}: entry {number} has no 'id'")
    label = ssv2_label_from_template(entry["template"]) if "template" in entry else ""
    records.append(VideoRecord(os.path.join(video_root, f"{entry['id']}.webm"), label, split))
  return records


# --- UCF101 -----------------------------------------------------------------------

def read_ucf101_class_index(class_ind_txt: str) -> list[str]:
  """`classInd.txt` -> class names in index order (index 1 first)."""
  by_index: dict[int, str] = {}
  with open(class_ind_txt, encoding="utf-8") as f:
    for line, text in enumerate(f, start=1):
      parts = text.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[0].isdigit():
        raise DatasetListError(f"{class_ind_txt}:{line}: expected '<index> <ClassName>'")
      by_index[int(parts[0])] = parts[1]
  if sorted(by_index) != list(range(1, len(by_index) + 1)):
    raise DatasetListError(f"{class_ind_txt}: class indices must be 1..{len(by_index)}")
  return [by_index[i] for i in range(1, len(by_index) + 1)]


def _ucf101_split_name(list_file: str) -> str:
  name = os.path.basename(list_file).lower()
  if name.startswith("train"):
    return "train"
  if name.startswith("test"):
    return "test"
  return os.path.splitext(name)[0]


def read_ucf101_list(list_file: str, class_names: Sequence[str],
                     video_root: str) -> list[VideoRecord]:
  """`trainlist0N.txt` / `testlist0N.txt` -> records."""
  by_folder = {name.lower(): name for name in class_names}
  split = _ucf101_split_name(list_file)
  records = []
  with open(list_file, encoding="utf-8") as f:
    for line, text in enumerate(f, start=1):
      parts = text.split()
      if not parts:
        continue
      where = f"{list_file}:{line}"
      relative = parts[0].replace("\\", "/")
      if len(parts) >= 2:
        if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(class_names):
          raise DatasetListError(
              f"{where}: class index must be in [1, {len(class_names)}], got {parts[1]!r}")
        label = class_names[int(parts[1]) - 1]
      else:
        folder = relative.split("/")[0] if "/" in relative else ""
        if folder.lower() not in by_folder:
          raise DatasetListError(f"{where}: folder {folder!r} is not a class in classInd.txt")
        label = by_folder[folder.lower()]
      path = os.path.join(video_root, relative)
      flat = os.path.join(video_root, os.path.basename(relative))
      if not os.path.exists(path) and os.path.exists(flat):
        path = flat  # videos extracted without class folders.
      records.append(VideoRecord(path, label, split))
  return records


def read_ucf101_split(split_dir: str, video_root: str, fold: int = 1) -> DatasetList:
  """`ucfTrainTestlist/` (classInd + train/test lists of fold `fold`) -> both splits."""
  _check_fold(fold)
  class_names = read_ucf101_class_index(os.path.join(split_dir, "classInd.txt"))
  records = []
  for kind in ("trainlist", "testlist"):
    records += read_ucf101_list(os.path.join(split_dir, f"{kind}{fold:02d}.txt"),
                                class_names, video_root)
  return DatasetList(records, class_names)


# --- HMDB51 -----------------------------------------------------------------------

_HMDB_SPLITS = {"1": "train", "2": "test", "0": UNUSED_SPLIT}
_HMDB_FILE = re.compile(r"^(?P<label>.+)_test_split(?P<fold>\d+)\.txt$")


def read_hmdb51_splits(split_dir: str, video_root: str, fold: int = 1) -> DatasetList:
  """`testTrainMulti_7030_splits/` files of fold `fold` -> train, test and unused records."""
  _check_fold(fold)
  files = sorted(glob.glob(os.path.join(split_dir, f"*_test_split{fold}.txt")))
  if not files:
    raise DatasetListError(f"{split_dir}: no HMDB51 files '*_test_split{fold}.txt'")
  records, class_names = [], []
  for split_file in files:
    label = _HMDB_FILE.match(os.path.basename(split_file)).group("label")
    class_names.append(label)
    with open(split_file, encoding="utf-8") as f:
      for line, text in enumerate(f, start=1):
        parts = text.split()
        if not parts:
          continue
        if len(parts) != 2 or parts[1] not in _HMDB_SPLITS:
          raise DatasetListError(
              f"{split_file}:{line}: expected '<video>.avi <0|1|2>', got {text.strip()!r}")
        records.append(VideoRecord(os.path.join(video_root, label, parts[0]), label,
                                   _HMDB_SPLITS[parts[1]]))
  return DatasetList(records, class_names)


def _check_fold(fold: int) -> None:
  if fold not in (1, 2, 3):
    raise DatasetListError(f"fold must be 1, 2 or 3, got {fold}")


# --- Dispatch ---------------------------------------------------------------------

def load_dataset_list(fmt: str, input_path: str, video_root: str | None = None,
                      fold: int = 1, split: str = "train") -> DatasetList:
  """Reads any supported format; `split` names the split of a plain CSV's rows.

  `input_path` is: the CSV (csv, kinetics400; a K400 folder of CSVs also works); the
  SSv2 labels folder or one of its split JSONs; the UCF101 `ucfTrainTestlist` folder or
  one list file in it; the HMDB51 split folder.
  """
  if fmt not in FORMATS:
    raise DatasetListError(f"format must be one of {FORMATS}, got {fmt!r}")
  if not os.path.exists(input_path):
    raise DatasetListError(f"{input_path}: no such file or folder")
  if fmt == "csv":
    records = read_csv_list(input_path, video_root, split)
    return DatasetList(records, sorted({r.label for r in records if r.label}))
  if video_root is None:
    raise DatasetListError(f"format {fmt!r} needs --video_root (the folder of the videos)")
  if fmt == "kinetics400":
    csv_files = (sorted(glob.glob(os.path.join(input_path, "*.csv")))
                 if os.path.isdir(input_path) else [input_path])
    index = index_videos(video_root)
    records = [r for f in csv_files for r in read_kinetics400_csv(f, video_root, index)]
    return DatasetList(records, sorted({r.label for r in records if r.label}))
  if fmt == "ssv2":
    folder = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    labels = read_ssv2_labels(os.path.join(folder, "labels.json"))
    if os.path.isdir(input_path):
      split_files = [os.path.join(folder, name) for name in
                     ("train.json", "validation.json", "test.json",
                      "something-something-v2-train.json",
                      "something-something-v2-validation.json",
                      "something-something-v2-test.json")
                     if os.path.exists(os.path.join(folder, name))]
    else:
      split_files = [input_path]
    records = [r for f in split_files for r in read_ssv2_split(f, video_root)]
    return DatasetList(records, sorted(labels, key=labels.get))
  if fmt == "ucf101":
    if os.path.isdir(input_path):
      return read_ucf101_split(input_path, video_root, fold)
    class_names = read_ucf101_class_index(
        os.path.join(os.path.dirname(input_path), "classInd.txt"))
    return DatasetList(read_ucf101_list(input_path, class_names, video_root), class_names)
  return read_hmdb51_splits(input_path, video_root, fold)
