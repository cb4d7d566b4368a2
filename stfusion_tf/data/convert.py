"""Dataset converters: official layouts -> sharded clip TFRecords.

One function per layout lists the videos (``VideoItem``: source, label, split)
without decoding anything; ``convert`` then decodes them with PyAV in a process
pool (both cores by default), resizes frames to a short side, JPEG-encodes
them, and writes shards through the same crash-safe writer as the synthetic
data.  Unreadable, truncated or empty videos, missing files and unknown labels
are skipped, counted and listed with their reason in ``manifest.json``.

Frozen videos: a video of two or more frames whose decoded frames are all
identical (pixel for pixel after resizing) is a known silent failure of some
decoders and of broken files (one frame repeated); real footage, even of a
still scene, has sensor and compression noise.  Such videos are counted and
listed in the manifest (``frozen``, ``num_frozen``) and skipped, with the reason
in ``skipped``: a motion class learnt from a still clip is label noise.
``keep_frozen=True`` keeps them (still listed under ``frozen``).  A one-frame
video cannot be judged and is kept.

Layouts
-------
``kinetics400``  ``<root>/<annotations>.csv`` (``label,youtube_id,time_start,time_end,split``)
                 and videos named ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under
                 ``<root>`` (the usual ``<split>/<label>/`` folders or flat).
``ssv1``         ``something-something-v1-{labels,train,validation}.csv`` (``id;label``) and
                 JPEG frame folders ``<frames_dir>/<id>/00001.jpg``.
``ssv2``         ``something-something-v2-{labels,train,validation}.json`` and
                 ``<videos_dir>/<id>.webm``.
``ucf101``       ``UCF-101/<Class>/v_*.avi`` and ``ucfTrainTestlist/{classInd.txt,
                 trainlist0N.txt,testlist0N.txt}`` (``split_id`` picks N).
``folder``       ``<root>/<class>/<video>`` or ``<root>/<split>/<class>/<video>``.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import sys
from typing import Callable, Sequence


from stfusion_tf import files
from stfusion_tf.errors import UserError
from stfusion_tf.data import framing, records
from stfusion_tf.progress import Progress

VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
LAYOUTS = ("kinetics400", "ssv1", "ssv2", "ucf101", "folder")


@dataclasses.dataclass(frozen=True)
class VideoItem:
    source: str  # a video file, or a folder of JPEG frames (SSv1)
    label: int
    split: str
    media_id: str


@dataclasses.dataclass
class Listing:
    """What a layout reader found: items to convert and inputs already rejected."""

    label_map: list[str]
    items: list[VideoItem]
    skipped: list[dict] = dataclasses.field(default_factory=list)

    def skip(self, source, reason, split=""):
        self.skipped.append({"source": str(source), "reason": reason, "split": split})

    def add(self, path, label: str, index: dict, split: str, media_id: str, exists=os.path.isfile,
            missing: str = "missing file", name: str | None = None) -> None:
        """Adds one video, or records why not (unknown label, missing file)."""
        if label not in index:
            self.skip(name or media_id, f"unknown label {label!r}", split)
        elif path is None or not exists(path):
            self.skip(path if path is not None else (name or media_id), missing, split)
        else:
            self.items.append(VideoItem(path, index[label], split, media_id))


# -- layout readers -----------------------------------------------------------------

def _walk_videos(root: str) -> dict[str, str]:
    """File stem -> path for every video file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for f in sorted(names):
            if f.lower().endswith(VIDEO_EXTS):
                out.setdefault(os.path.splitext(f)[0], os.path.join(d, f))
    return out


def list_kinetics400(root: str, annotations: Sequence[str]) -> Listing:
    """Kinetics-400: annotation CSVs (one per split) + trimmed videos found by name."""
    rows = []
    for path in annotations:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(row)
    labels = sorted({r["label"] for r in rows if r.get("label")})
    index = {name: i for i, name in enumerate(labels)}
    videos = _walk_videos(root)
    listing = Listing(labels, [])
    for r in rows:
        split = {"validate": "val", "validation": "val"}.get(r.get("split", "train"), r.get("split", "train"))
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        listing.add(videos.get(stem), r.get("label"), index, split, stem)
    return listing


def _ss_label_list_v1(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def list_ssv1(frames_dir: str, labels_csv: str, split_csvs: dict[str, str]) -> Listing:
    """Something-Something V1: ``id;label`` CSVs and JPEG frame folders."""
    labels = _ss_label_list_v1(labels_csv)
    index = {name: i for i, name in enumerate(labels)}
    listing = Listing(labels, [])
    for split, path in split_csvs.items():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                vid, _, label = line.partition(";")
                listing.add(os.path.join(frames_dir, vid), label, index, split, vid,
                            exists=os.path.isdir, missing="missing frame folder")
    return listing


def list_ssv2(videos_dir: str, labels_json: str, split_jsons: dict[str, str]) -> Listing:
    """Something-Something V2: JSON label files and ``<id>.webm`` videos."""
    with open(labels_json) as f:
        label_to_idx = {k: int(v) for k, v in json.load(f).items()}
    labels = [None] * len(label_to_idx)
    for name, i in label_to_idx.items():
        labels[i] = name
    listing = Listing(labels, [])
    for split, path in split_jsons.items():
        with open(path) as f:
            entries = json.load(f)
        for e in entries:
            vid = str(e["id"])
            label = e.get("template", e.get("label", "")).replace("[", "").replace("]", "")
            listing.add(os.path.join(videos_dir, f"{vid}.webm"), label, label_to_idx, split, vid)
    return listing


def list_ucf101(videos_dir: str, splits_dir: str, split_id: int = 1) -> Listing:
    """UCF101: ``classInd.txt`` + ``trainlist0N.txt`` / ``testlist0N.txt``."""
    if split_id not in (1, 2, 3):
        raise ValueError(f"split_id={split_id}; valid values: 1, 2, 3")
    classes = {}
    with open(os.path.join(splits_dir, "classInd.txt")) as f:
        for line in f:
            if line.strip():
                i, name = line.split()
                classes[name] = int(i) - 1
    labels = [n for n, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    listing = Listing(labels, [])
    for split, fname in (("train", f"trainlist0{split_id}.txt"), ("test", f"testlist0{split_id}.txt")):
        with open(os.path.join(splits_dir, fname)) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                rel = line.split()[0]
                listing.add(os.path.join(videos_dir, rel), rel.split("/")[0], classes, split,
                            os.path.splitext(os.path.basename(rel))[0], name=rel)
    return listing


def list_folder(root: str, splits: Sequence[str] = ("train", "val", "test")) -> Listing:
    """``<root>/<class>/<video>``, or ``<root>/<split>/<class>/<video>`` if split folders exist."""
    present = [s for s in splits if os.path.isdir(os.path.join(root, s))]
    split_roots = {s: os.path.join(root, s) for s in present} or {"train": root}
    classes = sorted({c for r in split_roots.values() for c in os.listdir(r)
                      if os.path.isdir(os.path.join(r, c))})
    if not classes:
        raise ValueError(f"no class folders under {root!r}")
    index = {c: i for i, c in enumerate(classes)}
    listing = Listing(classes, [])
    for split, r in split_roots.items():
        for c in sorted(os.listdir(r)):
            d = os.path.join(r, c)
            if not os.path.isdir(d):
                continue
            for f in sorted(os.listdir(d)):
                path = os.path.join(d, f)
                if f.lower().endswith(VIDEO_EXTS):
                    listing.items.append(VideoItem(path, index[c], split, f"{c}/{os.path.splitext(f)[0]}"))
                elif os.path.isfile(path):
                    listing.skip(path, "not a video file", split)
    return listing


def carve_holdout(listing: Listing, fraction: float, name: str = "holdout",
                  source_split: str = "train") -> Listing:
    """Moves a deterministic ``fraction`` of ``source_split`` into a new split.

    Strategy selection needs a split that is neither trained on nor reported on;
    datasets without a spare labelled split get one carved from training data.
    The choice depends only on each clip's media id (stable across re-runs).
    """
    import zlib
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return listing
    items = [dataclasses.replace(it, split=name)
             if it.split == source_split and zlib.crc32(it.media_id.encode()) % 10000 < fraction * 10000
             else it for it in listing.items]
    return Listing(listing.label_map, items, list(listing.skipped))


# -- decoding (runs in worker processes: PyAV, PIL, NumPy only) ---------------------------

def _resize_jpeg(img, short_side: int, quality: int) -> tuple[bytes, bytes]:
    """(JPEG of the frame resized to ``short_side``, its raw RGB pixels)."""
    from PIL import Image
    w, h = img.size
    if short_side and min(w, h) != short_side:
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.tobytes()


class _FrozenCheck:
    """Tells whether every frame added equals the first (pixel for pixel)."""

    def __init__(self):
        self.first, self.count, self.changed = None, 0, False

    def add(self, encoded: tuple[bytes, bytes]) -> bytes:
        jpeg, pixels = encoded
        if self.first is None:
            self.first = pixels
        elif not self.changed and pixels != self.first:
            self.changed = True
        self.count += 1
        return jpeg

    @property
    def frozen(self) -> bool:
        return self.count > 1 and not self.changed


def decode_item(item: VideoItem, short_side: int, quality: int = 90, max_frames: int = 0) -> dict:
    """Decodes one video (or frame folder) into resized JPEG frames.

    Returns ``{"frames": [...], "fps": float, "size": (h, w), "frozen": bool}`` (frozen:
    two or more frames, all identical) or ``{"error": reason}``; never raises for bad
    input, so one broken file cannot stop a conversion.
    """
    check = _FrozenCheck()
    try:
        if os.path.isdir(item.source):
            from PIL import Image
            names = sorted(f for f in os.listdir(item.source) if f.lower().endswith((".jpg", ".jpeg", ".png")))
            if max_frames:
                names = names[:max_frames]
            frames, size = [], (0, 0)
            for n in names:
                with Image.open(os.path.join(item.source, n)) as img:
                    size = (img.size[1], img.size[0])
                    frames.append(check.add(_resize_jpeg(img, short_side, quality)))
            fps = 12.0  # Something-Something V1 frames were extracted at 12 fps
        else:
            import av
            if os.path.getsize(item.source) == 0:
                return {"error": "zero-length file"}
            frames, size, fps = [], (0, 0), 0.0
            with av.open(item.source) as container:
                if not container.streams.video:
                    return {"error": "no video stream"}
                stream = container.streams.video[0]
                fps = float(stream.average_rate or 0.0)
                try:
                    for frame in container.decode(stream):
                        img = frame.to_image()
                        size = (img.size[1], img.size[0])
                        frames.append(check.add(_resize_jpeg(img, short_side, quality)))
                        if max_frames and len(frames) >= max_frames:
                            break
                except av.error.FFmpegError as e:  # truncated: keep what decoded if anything
                    if not frames:
                        return {"error": f"undecodable video: {e}"}
        if not frames:
            return {"error": "no decodable frames"}
        return {"frames": frames, "fps": fps, "size": size, "frozen": check.frozen}
    except Exception as e:  # noqa: BLE001 - any failure is reported per input
        return {"error": f"{type(e).__name__}: {e}"}


# -- conversion ------------------------------------------------------------------------------

def _shard_sidecar(path: str) -> str:
    return path + ".json"


def convert(listing: Listing, out_dir: str, name: str, short_side: int = 256,
            clips_per_shard: int = 256, workers: int | None = None, quality: int = 90,
            max_frames: int = 0, log: Callable = print, progress_stream=sys.stderr,
            settings: dict | None = None, keep_frozen: bool = False) -> dict:
    """Decodes and writes every listed video; returns the manifest.

    A shard is complete when its ``.tfrecord`` and its ``.tfrecord.json`` sidecar
    (labels, media ids, frame counts, skipped and frozen inputs, size and SHA-256)
    both exist; re-running skips complete shards.  The manifest is written last.
    ``settings`` (how the listing was made: split, annotations, hold-out fraction)
    go into the manifest with ``clips_per_shard`` and ``max_frames``, so
    ``--mode=verify`` can rewrite a damaged shard from the source exactly as it
    was.  Frozen videos (module docstring) are skipped unless ``keep_frozen``.
    """
    os.makedirs(out_dir, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    prepare = {**(settings or {}), "clips_per_shard": clips_per_shard, "max_frames": max_frames,
               "keep_frozen": keep_frozen}
    builder = records.ManifestBuilder(name, listing.label_map, extra={
        "short_side": short_side, "source_layout": name, "prepare": prepare})
    builder.skipped.extend(listing.skipped)
    by_split: dict[str, list[VideoItem]] = {}
    for it in listing.items:
        by_split.setdefault(it.split, []).append(it)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for split, items in sorted(by_split.items()):
            n_shards = max(1, -(-len(items) // clips_per_shard))
            shards, labels, nframes, shard_clips, digests = [], [], [], [], []
            prog = Progress(len(items), f"{name}/{split}", progress_stream)
            for s in range(n_shards):
                fname = records.shard_name(split, s, n_shards)
                path = os.path.join(out_dir, fname)
                chunk = items[s * clips_per_shard:(s + 1) * clips_per_shard]
                shards.append(fname)
                side = _finished_shard(path)
                if side is not None:
                    prog.update_many(len(chunk))
                else:
                    side = _write_shard(pool, chunk, path, listing.label_map, short_side, quality,
                                        max_frames, prog, keep_frozen)
                labels.extend(side["labels"])
                shard_clips.append(len(side["labels"]))
                nframes.extend(side["num_frames"])
                builder.skipped.extend(side["skipped"])
                builder.frozen.extend(side.get("frozen", []))
                digests.append({"bytes": side["bytes"], "sha256": side["sha256"]})
            builder.add_split(split, shards, labels, nframes, shard_clips, digests)
    manifest = builder.write(out_dir)
    total = sum(len(v) for v in by_split.values()) + len(listing.skipped)
    log(f"[prepare] {out_dir}: {sum(s['num_clips'] for s in manifest['splits'].values())} clips "
        f"written, {manifest['num_skipped']} of {total} inputs skipped (reasons in manifest.json); "
        f"{manifest['num_frozen']} frozen (all decoded frames identical), "
        f"{'kept' if keep_frozen else 'skipped'}")
    return manifest


def _finished_shard(path: str) -> dict | None:
    """The sidecar of a shard written by an earlier run, or None when the shard must be
    (re)written: missing, or its sidecar missing or unreadable."""
    if not (os.path.exists(path) and os.path.exists(_shard_sidecar(path))):
        return None
    try:
        side = files.read_json(_shard_sidecar(path))
    except (OSError, ValueError):
        return None
    if "sha256" not in side:  # written before shards had checksums
        side.update(framing.file_digest(path))
    return side


def _write_shard(pool, chunk, path, label_map, short_side, quality, max_frames, prog,
                 keep_frozen=False) -> dict:
    side = {"labels": [], "media_ids": [], "num_frames": [], "skipped": [], "frozen": []}
    futures = [pool.submit(decode_item, it, short_side, quality, max_frames) for it in chunk]

    def gen():
        for it, fut in zip(chunk, futures):  # in order: shards are deterministic
            res = fut.result()
            if "error" in res:
                side["skipped"].append({"source": it.source, "reason": res["error"], "split": it.split})
                prog.update(False)
                continue
            if res.get("frozen"):
                n = len(res["frames"])
                side["frozen"].append({"source": it.source, "split": it.split, "num_frames": n})
                if not keep_frozen:
                    side["skipped"].append({"source": it.source, "split": it.split, "reason":
                                            f"frozen: all {n} decoded frames are identical"})
                    prog.update(False)
                    continue
            side["labels"].append(it.label)
            side["media_ids"].append(it.media_id)
            side["num_frames"].append(len(res["frames"]))
            prog.update(True)
            yield records.make_sequence_example(
                res["frames"], it.label, label_map[it.label], it.media_id, frame_rate=res["fps"],
                source=it.source, original_size=res["size"])

    records.write_shard(path, gen())
    side.update(framing.file_digest(path))
    files.write_json(_shard_sidecar(path), side)
    return side


def prepare(layout: str, source_dir: str | None, data_dir: str, *, short_side: int = 256,
            clips_per_shard: int = 256, workers: int | None = None, max_frames: int = 0,
            ucf_split: int = 1, annotations: Sequence[str] = (), holdout_fraction: float = 0.0,
            keep_frozen: bool = False, log: Callable = print) -> dict:
    """``--mode=prepare`` for a real dataset: list it, carve the hold-out split, convert;
    the settings go into the manifest (``--mode=verify`` rewrites shards with them)."""
    if not source_dir:
        raise UserError(f"--dataset={layout} needs --source_dir (the raw dataset)")
    annotations = [os.path.abspath(a) for a in annotations]
    try:
        listing = carve_holdout(list_dataset(layout, source_dir, ucf_split, annotations),
                                holdout_fraction)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot read {layout} from {source_dir}: {e}") from None
    manifest = convert(listing, data_dir, layout, short_side=short_side,
                       clips_per_shard=clips_per_shard, workers=workers, max_frames=max_frames,
                       keep_frozen=keep_frozen, log=log,
                       settings={"ucf_split": ucf_split, "annotations": annotations,
                                 "holdout_fraction": holdout_fraction})
    if not any(s["num_clips"] for s in manifest["splits"].values()):
        raise UserError(f"no clip of {source_dir} could be converted; "
                        f"see {data_dir}/manifest.json for the reasons")
    return manifest


def _first_existing(*paths):
    for p in paths:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"none of these exist: {', '.join(paths)}")


def list_dataset(layout: str, source_dir: str, ucf_split: int = 1,
                 annotations: Sequence[str] = ()) -> Listing:
    """Lists a dataset in its official layout under ``source_dir`` (see module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid values: {', '.join(LAYOUTS)}")
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"source directory {source_dir!r} does not exist")
    j = functools.partial(os.path.join, source_dir)
    if layout == "kinetics400":
        if not annotations:
            annotations = [p for p in (j("annotations", "train.csv"), j("annotations", "validate.csv"),
                                       j("annotations", "val.csv"), j("annotations", "test.csv"))
                           if os.path.exists(p)]
        if not annotations:
            raise FileNotFoundError(f"no annotation CSVs: pass --annotations or put them in "
                                    f"{j('annotations')}/{{train,validate}}.csv")
        return list_kinetics400(source_dir, annotations)
    if layout == "ssv1":
        pre = "something-something-v1-"
        return list_ssv1(_first_existing(j("20bn-something-something-v1"), j("frames")),
                         j(pre + "labels.csv"),
                         {"train": j(pre + "train.csv"), "val": j(pre + "validation.csv")})
    if layout == "ssv2":
        def find(kind):
            return _first_existing(j("labels", f"{kind}.json"),
                                   j("labels", f"something-something-v2-{kind}.json"),
                                   j(f"something-something-v2-{kind}.json"))
        return list_ssv2(_first_existing(j("20bn-something-something-v2"), j("videos")),
                         find("labels"), {"train": find("train"), "val": find("validation")})
    if layout == "ucf101":
        return list_ucf101(_first_existing(j("UCF-101"), j("videos")),
                           _first_existing(j("ucfTrainTestlist"), j("splits")), ucf_split)
    return list_folder(source_dir)
