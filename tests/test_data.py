"""Record format, crash-safe writer, synthetic tasks' properties, tf.data pipeline."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from stfusion_tf.errors import UserError
from stfusion_tf.data import framing, pipeline, records, synthetic


def _records(data_dir, split):
    return [r.numpy() for r in tf.data.TFRecordDataset(records.shard_paths(data_dir, split))]


def test_writer_reader_round_trip(motion_dir):
    spec = synthetic.SyntheticSpec(name="synthetic_motion", num_train=48, num_val=16, num_test=16,
                                   clips_per_shard=16)
    recs = _records(motion_dir, "val")
    assert len(recs) == 16
    for i in (0, 5):
        enc, label, media_id = pipeline.parse_clip(recs[i])
        frames = np.stack([tf.io.decode_jpeg(e).numpy() for e in enc.numpy()])
        want, want_label = synthetic.render_clip(spec, "val", i)
        assert int(label) == want_label and media_id.numpy() == f"synthetic_motion/val/{i:06d}".encode()
        assert frames.shape == want.shape
        assert np.mean(np.abs(frames.astype(float) - want)) < 10.0  # JPEG q90 drops pixel noise
        assert np.corrcoef(frames.ravel(), want.ravel())[0, 1] > 0.95


def test_manifest_describes_the_dataset(motion_dir):
    m = records.read_manifest(motion_dir)
    assert m["label_map"] == ["east", "west", "south", "north"]
    assert m["splits"]["train"]["num_clips"] == 48
    assert m["splits"]["train"]["shards"] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert sum(m["splits"]["train"]["clips_per_class"].values()) == 48
    assert m["splits"]["val"]["num_frames"] == {"min": 16, "max": 16, "mean": 16.0}
    assert m["num_skipped"] == 0 and m["skipped"] == []


def test_model_garden_decoder_parses_our_records(motion_dir):
    from official.vision.dataloaders import video_input
    rec = _records(motion_dir, "test")[3]
    out = video_input.Decoder().decode(tf.constant(rec))
    assert out[video_input.IMAGE_KEY].shape == (16,)
    assert int(out[video_input.LABEL_KEY][0]) == 3
    assert tf.io.decode_jpeg(out[video_input.IMAGE_KEY][0]).shape == (40, 40, 3)


def test_crash_leaves_nothing_that_looks_complete_and_rerun_resumes(tmp_path, monkeypatch):
    spec = synthetic.SyntheticSpec(num_train=8, num_val=4, num_test=4, clips_per_shard=4)
    calls = {"n": 0}
    real = records.make_sequence_example

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(records, "make_sequence_example", flaky)
    with pytest.raises(RuntimeError):
        synthetic.prepare_synthetic(str(tmp_path), spec, log=lambda *a: None)
    names = sorted(os.listdir(tmp_path))
    assert "manifest.json" not in names
    # The shard finished before the crash stays; the cut one leaves nothing behind.
    assert names == ["train-00000-of-00002.tfrecord"]
    done = os.path.getmtime(tmp_path / names[0])
    monkeypatch.setattr(records, "make_sequence_example", real)
    m = synthetic.prepare_synthetic(str(tmp_path), spec, log=lambda *a: None)
    assert os.path.getmtime(tmp_path / names[0]) == done  # finished shard skipped
    assert m["splits"]["train"]["num_clips"] == 8
    assert len(_records(str(tmp_path), "train")) == 8


def _displacements(frames):
    """Per-step displacement (dy, dx) of the moving content: static background
    removed (temporal median), then phase correlation of consecutive frames."""
    f = frames.astype(np.float32).mean(-1)
    f = f - np.median(f, axis=0, keepdims=True)
    out = []
    for a, b in zip(f[:-1], f[1:]):
        r = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a)))
        dy, dx = np.unravel_index(np.argmax(np.abs(r)), r.shape)
        n = f.shape[1]
        out.append(((dy + n // 2) % n - n // 2, (dx + n // 2) % n - n // 2))
    return np.array(out)


def _direction_class(frames):
    dy, dx = np.median(_displacements(frames), axis=0)
    vec = (int(np.sign(dy)), int(np.sign(dx)))
    table = {v: i for i, v in enumerate(synthetic._DIR_VEC[d] for d in synthetic.DIRECTIONS)}
    return table.get(vec, -1)


def test_synthetic_motion_class_is_only_in_the_motion():
    spec = synthetic.SyntheticSpec(name="synthetic_motion", num_classes=4)
    clips = [synthetic.render_clip(spec, "train", i) for i in range(160)]
    labels = np.array([c[1] for c in clips])
    rng = np.random.default_rng(0)
    # In order, the motion gives the class...
    ordered = np.array([_direction_class(f) for f, _ in clips])
    assert np.mean(ordered == labels) > 0.95
    # ... time reversal maps each class to its opposite (i <-> i ^ 1) ...
    reversed_ = np.array([_direction_class(f[::-1]) for f, _ in clips])
    assert np.mean(reversed_ == (labels ^ 1)) > 0.95
    # ... and a frame-shuffled view carries no class information.
    shuffled = np.array([_direction_class(f[rng.permutation(len(f))]) for f, _ in clips])
    assert np.mean(shuffled == labels) < 0.45
    # Single frames: a nearest-centroid classifier on 10x10 thumbnails is at chance.
    def thumb(f):
        return f.reshape(10, 4, 10, 4, 3).mean((1, 3)).ravel()
    feats = np.array([thumb(f[rng.integers(len(f))]) for f, _ in clips])
    train, test = slice(0, 100), slice(100, 160)
    cents = np.stack([feats[train][labels[train] == c].mean(0) for c in range(4)])
    pred = np.argmin(((feats[test][:, None] - cents[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == labels[test]) < 0.45


def _orientation_energy(frame):
    """Spectral power of one frame by orientation (12 bins over 180 degrees),
    normalised: the statistics that tell stripes, checkers and hexagonal dots apart."""
    f = frame.astype(np.float32).mean(-1)
    p = np.abs(np.fft.fft2(f - f.mean())) ** 2
    n = p.shape[0]
    k = np.fft.fftfreq(n) * n
    ky, kx = np.meshgrid(k, k, indexing="ij")
    band = (np.hypot(ky, kx) >= 2) & (np.hypot(ky, kx) <= n // 3)
    angle = np.degrees(np.arctan2(ky, kx)) % 180
    hist = np.bincount((angle[band] // 15).astype(int) % 12, weights=p[band], minlength=12)
    return hist / hist.sum()


def test_synthetic_appearance_class_is_in_single_frames_and_motion_is_not():
    spec = synthetic.SyntheticSpec(name="synthetic_appearance", num_classes=4)
    clips = [synthetic.render_clip(spec, "train", i) for i in range(160)]
    labels = np.array([c[1] for c in clips])
    rng = np.random.default_rng(0)
    # One random frame per clip: a nearest-centroid classifier on texture statistics
    # tells the class.
    feats = np.array([_orientation_energy(f[rng.integers(len(f))]) for f, _ in clips])
    train, test = slice(0, 100), slice(100, 160)
    cents = np.stack([feats[train][labels[train] == c].mean(0) for c in range(4)])
    pred = np.argmin(((feats[test][:, None] - cents[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == labels[test]) > 0.9
    # The drift of the texture is independent of the class: every class drifts several ways.
    dirs = np.array([_direction_class(f) for f, _ in clips[:40]])
    for c in range(4):
        assert len(set(dirs[:40][labels[:40] == c])) > 1
    # A horizontal flip keeps the class (the configs may flip appearance data).
    flipped = np.array([_orientation_energy(f[0][:, ::-1]) for f, _ in clips[100:]])
    pred = np.argmin(((flipped[:, None] - cents[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == labels[test]) > 0.9


def test_synthetic_fine_motion_is_visible_only_at_fine_scale():
    spec = synthetic.SyntheticSpec(name="synthetic_fine_motion", num_classes=4)
    clips = [synthetic.render_clip(spec, "train", i) for i in range(80)]
    labels = np.array([c[1] for c in clips])
    # At full resolution the drift gives the class ...
    assert np.mean(np.array([_direction_class(f) for f, _ in clips]) == labels) > 0.95
    # ... in 20-px cells (the upper half's resolution: 16-px cells of a 32-px crop) the
    # displacement per frame is below a cell and no longer found: at most chance.
    def pool(f):
        t, h, w, c = f.shape
        return f.reshape(t, h // 20, 20, w // 20, 20, c).mean((2, 4))
    pooled = np.array([_direction_class(pool(f.astype(np.float32))) for f, _ in clips])
    assert np.mean(pooled == labels) < 0.45
    # Single frames: a nearest-centroid classifier on 10x10 thumbnails is at chance.
    rng = np.random.default_rng(0)
    feats = np.array([f[rng.integers(len(f))].reshape(10, 4, 10, 4, 3).mean((1, 3)).ravel()
                      for f, _ in clips])
    cents = np.stack([feats[:50][labels[:50] == c].mean(0) for c in range(4)])
    pred = np.argmin(((feats[50:][:, None] - cents[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == labels[50:]) < 0.5


def test_train_pipeline_shapes_and_labels(motion_dir):
    cfg = pipeline.InputConfig(batch_size=4)
    x, y = next(iter(pipeline.train_dataset(motion_dir, "train", cfg)))
    assert x.shape == (4, 8, 32, 32, 3) and x.dtype == tf.uint8  # the network normalises
    assert set(y.numpy()) <= {0, 1, 2, 3}
    assert 20 < float(tf.reduce_mean(tf.cast(x, tf.float32))) < 235


def test_train_crop_is_a_window_of_consecutive_decoded_frames(motion_dir):
    rec = _records(motion_dir, "val")[2]
    enc, _, _ = pipeline.parse_clip(rec)
    full = np.stack([tf.io.decode_jpeg(e).numpy() for e in enc.numpy()])  # [16, 40, 40, 3]
    cfg = pipeline.InputConfig(num_frames=6, stride=2, crop_size=24, min_short_side=40,
                               max_short_side=40, seed=3)
    for _ in range(3):
        clip = pipeline.preprocess_train(enc, cfg).numpy()
        hits = [(t, y, x) for t in range(16 - 10) for y in range(17) for x in range(17)
                if np.array_equal(clip, full[t:t + 12:2, y:y + 24, x:x + 24])]
        assert len(hits) == 1
    # With scale jitter the window is resized to the crop size.
    jit = pipeline.InputConfig(num_frames=6, crop_size=24, min_short_side=44, max_short_side=60)
    assert pipeline.preprocess_train(enc, jit).shape == (6, 24, 24, 3)


def test_eval_views_are_grouped_per_video(motion_dir):
    cfg = pipeline.InputConfig(num_clips=2, num_crops=3, temporal_pool=True, batch_size=5)
    xs, ys, vs = [], [], []
    for x, y, v in pipeline.eval_dataset(motion_dir, "val", cfg):
        xs.append(x.shape)
        ys.extend(y.numpy())
        vs.extend(v.numpy())
    assert xs[0][1:] == (3, 32, 32, 3)  # 8 frames pooled (window 3, stride 2) -> 3
    assert len(vs) == 16 * 6
    vs, ys = np.array(vs), np.array(ys)
    for vid in range(16):
        assert np.sum(vs == vid) == 6 and len(set(ys[vs == vid])) == 1


def test_pipeline_streams_shards_over_http(motion_dir):
    from http_server import serve
    with serve(motion_dir) as url:
        n = sum(int(x.shape[0]) for x, _, _ in pipeline.eval_dataset(
            url, "test", pipeline.InputConfig(batch_size=8)))
        x, _ = next(iter(pipeline.train_dataset(url, "train", pipeline.InputConfig(batch_size=4))))
    assert n == 16 and x.shape[0] == 4


def test_bad_split_names_valid_ones(motion_dir):
    with pytest.raises(ValueError, match="valid splits: test, train, val"):
        records.shard_paths(motion_dir, "validation")
    with pytest.raises(UserError, match="run --mode=prepare"):
        records.read_manifest(motion_dir + "/nope")


def test_tf_data_service_on_loopback_with_two_workers(motion_dir):
    from stfusion_tf.data import service
    svc = service.start(port=0, num_workers=2)
    assert svc.target.startswith("grpc://localhost:")
    ds = pipeline.train_dataset(motion_dir, "train", pipeline.InputConfig(batch_size=4),
                                data_service=svc.target)
    batches = list(ds.take(6))
    assert len(batches) == 6
    assert all(x.shape == (4, 8, 32, 32, 3) and y.shape == (4,) for x, y in batches)
    with pytest.raises(ValueError, match="grpc://host:port"):
        service.distribute(ds, "localhost:5000")


def test_corrupt_frames_are_dropped_and_counted(tmp_path):
    spec = synthetic.SyntheticSpec(num_train=12, num_val=2, num_test=2, clips_per_shard=6)
    synthetic.prepare_synthetic(str(tmp_path), spec, log=lambda *a: None)
    # Rewrite shard 1 with three clips whose 5th frame is not a JPEG.
    path = tmp_path / "train-00001-of-00002.tfrecord"
    recs = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    out = []
    for i, r in enumerate(recs):
        if i < 3:
            ex = tf.train.SequenceExample.FromString(r)
            ex.feature_lists.feature_list["image/encoded"].feature[4].bytes_list.value[0] = b"not a jpeg"
            r = ex.SerializeToString()
        out.append(r)
    records.write_shard(str(path), out)
    stats = pipeline.InputStats()
    cfg = pipeline.InputConfig(batch_size=1, num_frames=16)  # every frame is decoded
    n = sum(1 for _ in pipeline.train_dataset(str(tmp_path), "train", cfg, repeat=False, stats=stats))
    assert n == 9
    assert stats.dropped == 3 and int(stats.attempted.numpy()) == 12


def test_a_damaged_record_costs_that_record_only_and_is_counted(tmp_path):
    spec = synthetic.SyntheticSpec(num_train=12, num_val=4, num_test=2, clips_per_shard=6)
    synthetic.prepare_synthetic(str(tmp_path), spec, log=lambda *a: None)
    assert records.shard_clip_counts(str(tmp_path), "train") == [6, 6]
    # Overwrite 8 bytes inside the 3rd record of shard 0: a CRC error, which ends a
    # TFRecordDataset read; the pipeline reads on past it.
    for split in ("train", "val"):
        path = tmp_path / records.shard_name(split, 0, 2 if split == "train" else 1)
        recs = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
        data = bytearray(path.read_bytes())
        offset = sum(len(r) + 16 for r in recs[:2]) + 12 + 40
        data[offset:offset + 8] = bytes(8)
        path.write_bytes(bytes(data))
    assert sum(1 for _ in tf.data.TFRecordDataset(str(path)).ignore_errors()) == 2
    stats = pipeline.InputStats()
    cfg = pipeline.InputConfig(batch_size=1)
    ds = pipeline.train_dataset(str(tmp_path), "train", cfg, repeat=False, stats=stats)
    assert sum(1 for _ in ds) == 11  # 5 readable records of shard 0 + all 6 of shard 1
    assert stats.lost_records == 1 and stats.dropped == 0
    # A second pass counts again (per pass, per shard).
    assert sum(1 for _ in ds) == 11 and stats.lost_records == 2
    # Repeated at the file level, reads of one shard overlap in the interleave; each
    # read has its own count: every good record comes ~10 times in 10 epochs, the
    # damaged one never, one loss per read of shard 0.
    stats = pipeline.InputStats()
    files = records.shard_paths(str(tmp_path), "train")
    good = {r.numpy() for r in tf.data.TFRecordDataset(files).ignore_errors()} | set(
        framing.readable_records(files[0], skip=2))
    seen = collections.Counter(r.numpy() for r in pipeline._records(
        files, True, 0, repeat=True, stats=stats, expected=[6, 6]).take(110))
    assert set(seen) == good and len(good) == 11
    assert 8 <= min(seen.values()) and max(seen.values()) <= 12
    assert 8 <= stats.lost_records <= 12
    # Evaluation scores every video it can read.
    vids = {int(v) for _, _, v in pipeline.eval_dataset(str(tmp_path), "val", cfg).unbatch()}
    assert len(vids) == 3


def test_the_framing_reader_resynchronises_on_any_damage(tmp_path):
    rng = np.random.default_rng(0)
    recs = [rng.bytes(int(rng.integers(50, 3000))) for _ in range(40)]
    path = str(tmp_path / "x.tfrecord")
    records.write_shard(path, recs)
    clean = open(path, "rb").read()
    start = np.cumsum([0] + [len(r) + 16 for r in recs])

    def damage(at, n=8):
        data = bytearray(clean)
        data[at:at + n] = bytes(a ^ 0x5A for a in data[at:at + n])
        return bytes(data)

    cases = {  # name: (file bytes, records lost)
        "data": (damage(start[3] + 12 + 40), [3]),
        "length": (damage(start[7] + 2, 4), [7]),
        "length crc": (damage(start[9] + 8, 2), [9]),
        "data crc": (damage(start[13] - 3, 2), [12]),
        "across two records": (damage(start[30] - 4, 8), [29, 30]),
        "cut in a record": (clean[:start[39] + 100], [39]),
        "cut in a header": (clean[:start[39] + 5], [39]),
    }
    for name, (data, lost) in cases.items():
        with open(path, "wb") as f:
            f.write(data)
        got = list(framing.readable_records(path))
        assert got == [r for i, r in enumerate(recs) if i not in lost], name
        fast = sum(1 for _ in tf.data.TFRecordDataset(path).ignore_errors())
        assert fast == lost[0]
        assert list(framing.readable_records(path, skip=fast)) == got[fast:], name


def test_repeated_healthy_shards_lose_nothing(motion_dir):
    # 3 shards in a cycle of 3, repeated: the next epoch's read of a shard starts
    # while the last one is still being read.
    stats = pipeline.InputStats()
    ds = pipeline.train_dataset(motion_dir, "train", pipeline.InputConfig(batch_size=8, shuffle_buffer=4),
                                stats=stats)
    assert sum(1 for _ in ds.take(60)) == 60  # 10 epochs
    assert stats.lost_records == 0 and stats.dropped == 0


def test_segment_sampling_takes_one_frame_per_segment(motion_dir):
    enc = tf.strings.as_string(tf.range(20))
    cfg = pipeline.InputConfig(num_frames=4, sampling="segments", num_clips=2)
    idx = [int(x) for x in pipeline.sample_frames(enc, cfg, training=True).numpy()]
    assert [i // 5 for i in idx] == [0, 1, 2, 3]
    ev = [int(x) for x in pipeline.sample_frames(enc, cfg, training=False).numpy()]
    assert ev == [1, 6, 11, 16, 3, 8, 13, 18]  # offsets 0.25 and 0.75 of each segment
    short = pipeline.sample_frames(tf.strings.as_string(tf.range(3)), cfg, training=False)
    assert short.shape == (8,)
    with pytest.raises(ValueError, match="valid values: dense, segments"):
        pipeline.InputConfig(sampling="tsn")
    x, _ = next(iter(pipeline.train_dataset(motion_dir, "train",
                                            pipeline.InputConfig(batch_size=2, sampling="segments"))))
    assert x.shape == (2, 8, 32, 32, 3)
