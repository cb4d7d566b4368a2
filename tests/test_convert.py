"""Converters: real encoded videos through each dataset layout, bad inputs skipped and reported."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.data import convert, pipeline, records
from video_files import write_frames_dir, write_video


def _convert(listing, out, **kw):
    return convert.convert(listing, str(out), "test", short_side=32, clips_per_shard=2,
                           workers=2, log=lambda *a: None, progress_stream=open(os.devnull, "w"), **kw)


def _read(out, split):
    recs = [r.numpy() for r in tf.data.TFRecordDataset(records.shard_paths(str(out), split))]
    return [pipeline.parse_clip(r) for r in recs]


def test_folder_of_mp4_webm_avi_with_bad_inputs(tmp_path):
    root = tmp_path / "videos"
    for cls in ("jump", "run"):
        (root / cls).mkdir(parents=True)
    write_video(root / "jump" / "a.mp4", seed=1)
    write_video(root / "jump" / "b.webm", seed=2)
    write_video(root / "run" / "c.avi", seed=3)
    write_video(root / "run" / "d.mp4", n=5, seed=4)
    (root / "run" / "empty.mp4").write_bytes(b"")
    (root / "run" / "garbage.avi").write_bytes(os.urandom(3000))
    good = (root / "jump" / "a.mp4").read_bytes()
    (root / "jump" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / "run" / "notes.txt").write_text("not a video")
    listing = convert.list_folder(str(root))
    assert listing.label_map == ["jump", "run"]
    m = _convert(listing, tmp_path / "out")
    clips = _read(tmp_path / "out", "train")
    reasons = {os.path.basename(s["source"]): s["reason"] for s in m["skipped"]}
    assert reasons["empty.mp4"] == "zero-length file"
    assert "garbage.avi" in reasons and "notes.txt" in reasons
    # The truncated mp4 either yields its first frames or is skipped, never crashes the run.
    n_ok = 4 + ("truncated.mp4" not in reasons)
    assert len(clips) == m["splits"]["train"]["num_clips"] == n_ok
    assert sum(m["splits"]["train"]["shard_clips"]) == n_ok  # skipped inputs are not counted
    assert m["num_skipped"] == len(m["skipped"]) == 7 - n_ok + 1
    by_id = {c[2].numpy().decode(): c for c in clips}
    enc, label, _ = by_id["run/c"]
    assert int(label) == 1 and enc.shape[0] == 12
    frame = tf.io.decode_jpeg(enc[0]).numpy()
    assert frame.shape == (32, 43, 3)  # 48x64 resized to short side 32
    assert by_id["run/d"][0].shape[0] == 5
    assert m["splits"]["train"]["num_frames"]["max"] == 12


def test_rerun_resumes_finished_shards(tmp_path):
    root = tmp_path / "videos"
    for i, cls in enumerate(("a", "b")):
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
        for j in range(3):
            write_video(root / "train" / cls / f"{j}.avi", n=4, seed=10 * i + j)
        write_video(root / "val" / cls / "v.avi", n=4, seed=99 + i)
    listing = convert.list_folder(str(root))
    out = tmp_path / "out"
    m1 = _convert(listing, out)
    assert m1["splits"]["train"]["num_clips"] == 6 and m1["splits"]["val"]["num_clips"] == 2
    first = out / "train-00000-of-00003.tfrecord"
    mtime = os.path.getmtime(first)
    (out / "manifest.json").unlink()
    (out / "train-00002-of-00003.tfrecord").unlink()  # as if the run died in shard 2
    m2 = _convert(listing, out)
    assert os.path.getmtime(first) == mtime
    assert m2["splits"] == m1["splits"]


def test_ucf101_layout(tmp_path):
    vids, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    names = {"ApplyEyeMakeup": ["v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g08_c01"],
             "Archery": ["v_Archery_g01_c01", "v_Archery_g08_c01"]}
    for cls, vs in names.items():
        (vids / cls).mkdir(parents=True)
        for v in vs:
            write_video(vids / cls / f"{v}.avi", n=6)
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g08_c01.avi 2\n"
        "Archery/v_Archery_g09_c01.avi 2\n")
    (lists / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g01_c01.avi\nBowling/v_Bowling_g01_c01.avi\n")
    listing = convert.list_ucf101(str(vids), str(lists), split_id=1)
    assert listing.label_map == ["ApplyEyeMakeup", "Archery"]
    assert [(i.split, i.label) for i in listing.items] == [("train", 0), ("train", 1), ("test", 0), ("test", 1)]
    assert {s["reason"] for s in listing.skipped} == {"missing file", "unknown label 'Bowling'"}
    m = _convert(listing, tmp_path / "out")
    assert m["splits"]["test"]["num_clips"] == 2 and m["num_skipped"] == 2
    with pytest.raises(ValueError, match="valid values: 1, 2, 3"):
        convert.list_ucf101(str(vids), str(lists), split_id=4)


def test_kinetics400_layout(tmp_path):
    root = tmp_path / "k400"
    (root / "train" / "abseiling").mkdir(parents=True)
    (root / "val").mkdir(parents=True)
    write_video(root / "train" / "abseiling" / "abc123_000010_000020.mp4", n=5)
    write_video(root / "val" / "xyz789_000000_000010.mp4", n=5)
    csv_path = tmp_path / "k400.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\n"
                        "abseiling,abc123,10,20,train\n"
                        "air drumming,xyz789,0,10,validate\n"
                        "air drumming,missing1,0,10,train\n")
    listing = convert.list_kinetics400(str(root), [str(csv_path)])
    assert listing.label_map == ["abseiling", "air drumming"]
    assert [(i.split, i.media_id) for i in listing.items] == [("train", "abc123_000010_000020"),
                                                              ("val", "xyz789_000000_000010")]
    assert listing.skipped[0]["reason"] == "missing file"
    m = _convert(listing, tmp_path / "out")
    assert m["splits"]["val"]["clips_per_class"] == {"abseiling": 0, "air drumming": 1}


def test_something_something_v1_frames_and_v2_webm(tmp_path):
    v1 = tmp_path / "v1"
    write_frames_dir(v1 / "frames" / "1", n=7)
    write_frames_dir(v1 / "frames" / "2", n=9)
    (v1 / "labels.csv").write_text("Holding something\nPushing something from left to right\n")
    (v1 / "train.csv").write_text("1;Holding something\n3;Holding something\n")
    (v1 / "validation.csv").write_text("2;Pushing something from left to right\n4;Dancing\n")
    lst = convert.list_ssv1(str(v1 / "frames"), str(v1 / "labels.csv"),
                            {"train": str(v1 / "train.csv"), "val": str(v1 / "validation.csv")})
    assert [(i.split, i.label) for i in lst.items] == [("train", 0), ("val", 1)]
    assert {s["reason"] for s in lst.skipped} == {"missing frame folder", "unknown label 'Dancing'"}
    m = _convert(lst, tmp_path / "out1")
    assert m["splits"]["val"]["num_frames"]["max"] == 9

    v2 = tmp_path / "v2"
    (v2 / "videos").mkdir(parents=True)
    write_video(v2 / "videos" / "11.webm", n=6)
    write_video(v2 / "videos" / "12.webm", n=6)
    (v2 / "labels.json").write_text(json.dumps({"Holding something": "0", "Putting something on something": "1"}))
    (v2 / "train.json").write_text(json.dumps([
        {"id": "11", "label": "holding a cup", "template": "Holding [something]", "placeholders": ["a cup"]}]))
    (v2 / "validation.json").write_text(json.dumps([
        {"id": "12", "label": "putting a cup on a box", "template": "Putting [something] on [something]"},
        {"id": "13", "label": "x", "template": "Putting [something] on [something]"}]))
    lst = convert.list_ssv2(str(v2 / "videos"), str(v2 / "labels.json"),
                            {"train": str(v2 / "train.json"), "val": str(v2 / "validation.json")})
    assert [(i.split, i.label) for i in lst.items] == [("train", 0), ("val", 1)]
    m = _convert(lst, tmp_path / "out2")
    clip = _read(tmp_path / "out2", "val")[0]
    assert int(clip[1]) == 1 and clip[0].shape[0] == 6
    assert m["num_skipped"] == 1


def test_decode_item_never_raises(tmp_path):
    item = convert.VideoItem(str(tmp_path / "nope.mp4"), 0, "train", "nope")
    assert "error" in convert.decode_item(item, 32)
    np.testing.assert_equal(convert.decode_item(item, 32).keys(), {"error"})


def test_holdout_is_carved_deterministically_from_train():
    items = [convert.VideoItem(f"/v/{i}.mp4", i % 3, "train", f"vid{i}") for i in range(2000)]
    items.append(convert.VideoItem("/v/x.mp4", 0, "val", "x"))
    lst = convert.carve_holdout(convert.Listing(["a", "b", "c"], items), 0.1)
    held = [i for i in lst.items if i.split == "holdout"]
    assert 150 < len(held) < 250
    assert lst.items[-1].split == "val"
    again = convert.carve_holdout(convert.Listing(["a", "b", "c"], items), 0.1)
    assert [i.split for i in again.items] == [i.split for i in lst.items]


def test_frozen_videos_are_counted_and_skipped_or_kept(tmp_path):
    """A video whose decoded frames are all identical (a decoder repeating one frame) is
    listed in the manifest; skipped by default, kept on request."""
    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    write_video(root / "a" / "moving.mp4", seed=1)
    write_video(root / "a" / "still.mp4", seed=2, still=True)
    write_video(root / "a" / "still.avi", seed=3, still=True)
    write_video(root / "a" / "one_frame.mp4", n=1, seed=4)  # cannot be judged: kept
    listing = convert.list_folder(str(root))
    m = _convert(listing, tmp_path / "skip")
    frozen = {os.path.basename(f["source"]): f["num_frames"] for f in m["frozen"]}
    assert frozen == {"still.mp4": 12, "still.avi": 12} and m["num_frozen"] == 2
    reasons = {os.path.basename(s["source"]): s["reason"] for s in m["skipped"]}
    assert reasons == {n: "frozen: all 12 decoded frames are identical" for n in frozen}
    assert m["splits"]["train"]["num_clips"] == 2
    assert {c[2].numpy().decode() for c in _read(tmp_path / "skip", "train")} == \
        {"a/moving", "a/one_frame"}
    m = _convert(listing, tmp_path / "keep", keep_frozen=True)
    assert m["num_frozen"] == 2 and m["num_skipped"] == 0
    assert m["splits"]["train"]["num_clips"] == 4
