"""Parsers of the generic CSV and the official K400 / SSv2 / UCF101 / HMDB51 split files."""

from __future__ import annotations

import collections
import json
import os

import pytest

from tcvm_jax.data import dataset_lists as dl


def touch(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()
  return str(path)


# --- Generic CSV ----------------------------------------------------------------------

def test_csv_without_header_resolves_against_its_folder(tmp_path):
  (tmp_path / "list.csv").write_text(
      "a/x.mp4,cat\n"
      "/abs/y.avi,dog,1.5,4\n"
      "\n"                       # blank lines are ignored.
      "z.webm,,0,2.5\n")         # empty label: unlabelled.
  records = dl.read_csv_list(str(tmp_path / "list.csv"), split="val")
  assert records == [
      dl.VideoRecord(str(tmp_path / "a" / "x.mp4"), "cat", "val"),
      dl.VideoRecord("/abs/y.avi", "dog", "val", 1.5, 4.0),
      dl.VideoRecord(str(tmp_path / "z.webm"), "", "val", 0.0, 2.5),
  ]


def test_csv_with_dmvr_header_and_video_root(tmp_path):
  # DMVR's generate_from_file CSVs: video_path,start,end,label (any column order).
  (tmp_path / "train.csv").write_text(
      "video_path,start,end,label,split\n"
      "brush_hair/v1.avi,0,20,brush_hair,train\n"
      "cartwheel/v2.avi,0,20,cartwheel,\n")
  records = dl.read_csv_list(str(tmp_path / "train.csv"), video_root="/videos", split="x")
  assert [r.path for r in records] == ["/videos/brush_hair/v1.avi", "/videos/cartwheel/v2.avi"]
  assert [r.label for r in records] == ["brush_hair", "cartwheel"]
  assert [r.split for r in records] == ["train", "x"]  # split column, else the default.
  assert all((r.start_seconds, r.end_seconds) == (0.0, 20.0) for r in records)
  dataset = dl.load_dataset_list("csv", str(tmp_path / "train.csv"), video_root="/videos")
  assert dataset.class_names == ["brush_hair", "cartwheel"]


@pytest.mark.parametrize("row,message", [
    ("v.mp4,a,5,2", "end .* must be greater than start"),
    ("v.mp4,a,-1,2", "start must be >= 0"),
    ("v.mp4,a,x,2", "start must be a number"),
    ("v.mp4,a,1,2,extra", "expected path,label"),
    (",a", "empty path"),
])
def test_csv_errors_name_file_and_line(tmp_path, row, message):
  (tmp_path / "bad.csv").write_text(f"ok.mp4,a\n{row}\n")
  with pytest.raises(dl.DatasetListError, match=message) as error:
    dl.read_csv_list(str(tmp_path / "bad.csv"))
  assert "bad.csv:2" in str(error.value)


# --- Kinetics-400 ---------------------------------------------------------------------

def test_kinetics400_csv_finds_trimmed_and_full_videos(tmp_path):
  root = tmp_path / "k400"
  trimmed = touch(root / "train" / "abseiling" / "aaaaaaaaaaa_000010_000020.mp4")
  full = touch(root / "downloads" / "bbbbbbbbbbb.mkv")
  # The same clip name elsewhere: the copy in the label's folder is preferred.
  touch(root / "other" / "aaaaaaaaaaa_000010_000020.mp4")
  (tmp_path / "train.csv").write_text(
      "label,youtube_id,time_start,time_end,split,is_cc\n"
      "abseiling,aaaaaaaaaaa,10,20,train,0\n"
      '"passing American football (in game)",bbbbbbbbbbb,3,13,train,0\n'
      "zumba,ccccccccccc,0,10,train,0\n")
  records = dl.read_kinetics400_csv(str(tmp_path / "train.csv"), str(root))
  assert records[0] == dl.VideoRecord(trimmed, "abseiling", "train")  # used whole.
  assert records[1] == dl.VideoRecord(full, "passing American football (in game)", "train",
                                      3.0, 13.0)  # trimmed by the converter.
  # Not on disk: kept (the converter reports it as missing), named as K400 names clips.
  assert records[2] == dl.VideoRecord(str(root / "ccccccccccc_000000_000010.mp4"), "zumba",
                                      "train")


def test_kinetics400_folder_of_csvs_with_unlabelled_test(tmp_path):
  root = tmp_path / "videos"
  touch(root / "val" / "ddddddddddd_000001_000011.mp4")
  touch(root / "test" / "eeeeeeeeeee_000002_000012.mp4")
  (tmp_path / "lists").mkdir()
  (tmp_path / "lists" / "validate.csv").write_text(
      "label,youtube_id,time_start,time_end,split\nzumba,ddddddddddd,1,11,validate\n")
  (tmp_path / "lists" / "test.csv").write_text(
      "youtube_id,time_start,time_end,split\neeeeeeeeeee,2,12,test\n")
  dataset = dl.load_dataset_list("kinetics400", str(tmp_path / "lists"), video_root=str(root))
  by_split = {r.split: r for r in dataset.records}
  assert set(by_split) == {"val", "test"}
  assert by_split["val"].label == "zumba" and by_split["test"].label == ""
  assert dataset.class_names == ["zumba"]
  with pytest.raises(dl.DatasetListError, match="not a Kinetics CSV"):
    (tmp_path / "wrong.csv").write_text("a,b\n1,2\n")
    dl.read_kinetics400_csv(str(tmp_path / "wrong.csv"), str(root))


# --- Something-Something v2 --------------------------------------------------------------

def test_ssv2_labels_and_splits(tmp_path):
  labels = {"Holding something next to something": "1", "Putting something on a surface": "0",
            "Pushing something from left to right": "2"}
  (tmp_path / "labels.json").write_text(json.dumps(labels))
  (tmp_path / "train.json").write_text(json.dumps([
      {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
       "template": "Holding [something] next to [something]", "placeholders": ["a", "b"]},
      {"id": "42326", "label": "putting a cup on a table",
       "template": "Putting [something] on a surface", "placeholders": ["a cup"]},
      {"id": "100904", "label": "pushing a pen from left to right",
       "template": "Pushing [something] from left to right", "placeholders": ["a pen"]}]))
  (tmp_path / "validation.json").write_text(json.dumps([
      {"id": "24", "label": "x", "template": "Putting [something] on a surface",
       "placeholders": []}]))
  (tmp_path / "test.json").write_text(json.dumps([{"id": "1420"}, {"id": "7"}]))
  dataset = dl.load_dataset_list("ssv2", str(tmp_path), video_root="/ssv2")
  assert dataset.class_names == ["Putting something on a surface",
                                 "Holding something next to something",
                                 "Pushing something from left to right"]  # by labels.json index.
  counts = collections.Counter(r.split for r in dataset.records)
  assert counts == {"train": 3, "validation": 1, "test": 2}
  first = dataset.records[0]
  assert first == dl.VideoRecord("/ssv2/78687.webm", "Holding something next to something",
                                 "train")
  assert all(r.label == "" for r in dataset.records if r.split == "test")
  # One split file alone; labels.json is read from beside it.
  only = dl.load_dataset_list("ssv2", str(tmp_path / "validation.json"), video_root="/ssv2")
  assert [r.path for r in only.records] == ["/ssv2/24.webm"] and len(only.class_names) == 3


# --- UCF101 ---------------------------------------------------------------------------

UCF_CLASSES = "1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n"


def write_ucf_lists(folder) -> None:
  os.makedirs(folder, exist_ok=True)
  (folder / "classInd.txt").write_text(UCF_CLASSES)
  (folder / "trainlist01.txt").write_text(
      "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
      "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\r\n"
      "YoYo/v_YoYo_g09_c02.avi 3\r\n"
      "YoYo/v_YoYo_g10_c01.avi 3\r\n")
  (folder / "testlist01.txt").write_text(
      "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
      "HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
  (folder / "trainlist02.txt").write_text("YoYo/v_YoYo_g01_c01.avi 3\n")
  (folder / "testlist02.txt").write_text("YoYo/v_YoYo_g09_c02.avi\n")


def test_ucf101_fold_lists(tmp_path):
  write_ucf_lists(tmp_path / "ucfTrainTestlist")
  dataset = dl.load_dataset_list("ucf101", str(tmp_path / "ucfTrainTestlist"),
                                 video_root="/UCF-101", fold=1)
  assert dataset.class_names == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
  train = [r for r in dataset.records if r.split == "train"]
  test = [r for r in dataset.records if r.split == "test"]
  assert [r.label for r in train] == ["ApplyEyeMakeup", "HandstandPushups", "YoYo", "YoYo"]
  assert [r.label for r in test] == ["ApplyEyeMakeup", "HandstandPushups"]  # from the folder.
  assert train[1].path == "/UCF-101/HandstandPushups/v_HandStandPushups_g08_c01.avi"
  fold2 = dl.load_dataset_list("ucf101", str(tmp_path / "ucfTrainTestlist"),
                               video_root="/UCF-101", fold=2)
  assert collections.Counter(r.split for r in fold2.records) == {"train": 1, "test": 1}
  single = dl.load_dataset_list("ucf101", str(tmp_path / "ucfTrainTestlist" / "testlist01.txt"),
                                video_root="/UCF-101")
  assert len(single.records) == 2 and {r.split for r in single.records} == {"test"}
  with pytest.raises(dl.DatasetListError, match="fold must be 1, 2 or 3"):
    dl.load_dataset_list("ucf101", str(tmp_path / "ucfTrainTestlist"), "/UCF-101", fold=4)


def test_ucf101_flat_video_folder_and_bad_index(tmp_path):
  write_ucf_lists(tmp_path / "lists")
  flat = touch(tmp_path / "flat" / "v_YoYo_g09_c02.avi")
  records = dl.read_ucf101_list(str(tmp_path / "lists" / "trainlist01.txt"),
                                ["ApplyEyeMakeup", "HandstandPushups", "YoYo"],
                                str(tmp_path / "flat"))
  assert records[2].path == flat  # found without the class folder.
  (tmp_path / "lists" / "trainlist03.txt").write_text("YoYo/v_YoYo_g01_c01.avi 3\nA/b.avi 4\n")
  with pytest.raises(dl.DatasetListError,
                     match=r"trainlist03.txt:2: class index must be in \[1, 3\]"):
    dl.read_ucf101_list(str(tmp_path / "lists" / "trainlist03.txt"),
                        ["ApplyEyeMakeup", "HandstandPushups", "YoYo"], "/v")


# --- HMDB51 ---------------------------------------------------------------------------

def test_hmdb51_split_files(tmp_path):
  splits = tmp_path / "testTrainMulti_7030_splits"
  splits.mkdir()
  (splits / "brush_hair_test_split1.txt").write_text(
      "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
      "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
      "April_09_brush_hair_u_nm_np1_ba_goo_2.avi 0 \n")
  (splits / "sword_exercise_test_split1.txt").write_text("s1.avi 1\ns2.avi 1\ns3.avi 2\n")
  (splits / "brush_hair_test_split2.txt").write_text("x.avi 2\n")  # other fold: ignored.
  dataset = dl.load_dataset_list("hmdb51", str(splits), video_root="/hmdb", fold=1)
  assert dataset.class_names == ["brush_hair", "sword_exercise"]
  counts = collections.Counter((r.label, r.split) for r in dataset.records)
  assert counts == {("brush_hair", "train"): 1, ("brush_hair", "test"): 1,
                    ("brush_hair", dl.UNUSED_SPLIT): 1, ("sword_exercise", "train"): 2,
                    ("sword_exercise", "test"): 1}
  assert dataset.records[0].path == "/hmdb/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"
  fold2 = dl.load_dataset_list("hmdb51", str(splits), video_root="/hmdb", fold=2)
  assert [(r.label, r.split) for r in fold2.records] == [("brush_hair", "test")]
  (splits / "cartwheel_test_split3.txt").write_text("c.avi 5\n")
  with pytest.raises(dl.DatasetListError, match=r"cartwheel_test_split3.txt:1"):
    dl.load_dataset_list("hmdb51", str(splits), video_root="/hmdb", fold=3)


def test_load_dataset_list_argument_errors(tmp_path):
  (tmp_path / "l.csv").write_text("a.mp4,b\n")
  with pytest.raises(dl.DatasetListError, match="format must be one of"):
    dl.load_dataset_list("kinetics600", str(tmp_path / "l.csv"))
  with pytest.raises(dl.DatasetListError, match="needs --video_root"):
    dl.load_dataset_list("ucf101", str(tmp_path))
  with pytest.raises(dl.DatasetListError, match="no such file"):
    dl.load_dataset_list("csv", str(tmp_path / "nothere.csv"))
