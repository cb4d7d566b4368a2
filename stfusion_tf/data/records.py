"""Clip record format and the crash-safe sharded writer.

One clip = one ``tf.train.SequenceExample`` that TF Model Garden's video decoder
(``official.vision.dataloaders.video_input.Decoder``) parses as is:

context
  ``clip/label/index`` int64, ``clip/label/text`` bytes, ``clip/media_id`` bytes,
  plus ``clip/frame_rate`` float, ``clip/source`` bytes (source path),
  ``clip/original_height`` / ``clip/original_width`` int64 (before resizing),
  ``clip/num_frames`` int64.
feature_lists
  ``image/encoded``: one JPEG per frame.

A dataset directory holds ``{split}-{i:05d}-of-{n:05d}.tfrecord`` shards and a
``manifest.json``.  Every file is written through ``files.atomic_path`` (a
temporary name, renamed when complete), so a crash never leaves a shard or
manifest that looks finished, and a re-run skips shards that exist.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Iterable, Sequence

import numpy as np

from stfusion_tf import files
from stfusion_tf.errors import UserError

MANIFEST = "manifest.json"
IMAGE_KEY = "image/encoded"
LABEL_KEY = "clip/label/index"
LABEL_TEXT_KEY = "clip/label/text"
MEDIA_ID_KEY = "clip/media_id"


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """Encodes one uint8 HxWx3 frame (PIL: no TF needed in worker processes)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sequence_example(jpeg_frames: Sequence[bytes], label: int, label_text: str,
                          media_id: str, frame_rate: float = 0.0, source: str = "",
                          original_size: tuple[int, int] = (0, 0)) -> bytes:
    """Serialises one clip (frames already JPEG-encoded)."""
    from tensorflow.core.example import example_pb2, feature_pb2  # protobuf only

    def _int(v):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v)]))

    def _bytes(v):
        v = v.encode() if isinstance(v, str) else v
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[v]))

    def _float(v):
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(v)]))

    ex = example_pb2.SequenceExample()
    ctx = ex.context.feature
    ctx[LABEL_KEY].CopyFrom(_int(label))
    ctx[LABEL_TEXT_KEY].CopyFrom(_bytes(label_text))
    ctx[MEDIA_ID_KEY].CopyFrom(_bytes(media_id))
    ctx["clip/frame_rate"].CopyFrom(_float(frame_rate))
    ctx["clip/source"].CopyFrom(_bytes(source))
    ctx["clip/original_height"].CopyFrom(_int(original_size[0]))
    ctx["clip/original_width"].CopyFrom(_int(original_size[1]))
    ctx["clip/num_frames"].CopyFrom(_int(len(jpeg_frames)))
    fl = ex.feature_lists.feature_list[IMAGE_KEY]
    for jpg in jpeg_frames:
        fl.feature.add().bytes_list.value.append(jpg)
    return ex.SerializeToString()


def write_shard(path: str, records: Iterable[bytes]) -> int:
    """Writes records to ``path`` atomically (``files.atomic_path``); returns the count."""
    import tensorflow as tf
    n = 0
    with files.atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as w:
            for r in records:
                w.write(r)
                n += 1
    return n


def read_manifest(data_dir: str) -> dict:
    """Reads ``manifest.json`` from a local directory or a URL (via tf.io.gfile)."""
    import tensorflow as tf
    path = data_dir.rstrip("/") + "/" + MANIFEST
    if "://" in data_dir:
        import tensorflow_io  # noqa: F401  registers http(s)/s3 filesystems
    if not tf.io.gfile.exists(path):
        raise UserError(
            f"no {MANIFEST} in {data_dir!r}: the dataset is missing or its preparation "
            "did not finish; run --mode=prepare")
    try:
        with tf.io.gfile.GFile(path) as f:
            manifest = json.load(f)
    except (ValueError, OSError, tf.errors.OpError) as e:
        raise UserError(f"{path} does not read ({type(e).__name__}: {str(e)[:120]}); re-run "
                        "--mode=prepare with the same flags: finished shards are kept and the "
                        "manifest is written again") from None
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise UserError(f"{path} is not a dataset manifest; re-run --mode=prepare")
    return manifest


def split_size(manifest: dict, split: str) -> int:
    """Clips in ``split``; a clear error for a split the dataset does not have."""
    if split not in manifest["splits"]:
        raise UserError(f"split {split!r} not in dataset {manifest.get('name', '')!r}; valid "
                        f"splits: {', '.join(sorted(manifest['splits']))}")
    return int(manifest["splits"][split]["num_clips"])


def shard_clip_counts(data_dir: str, split: str, manifest: dict | None = None) -> list[int] | None:
    """Clips written to each shard of ``split`` (None for datasets written without them)."""
    manifest = manifest or read_manifest(data_dir)
    return manifest["splits"][split].get("shard_clips")


def shard_paths(data_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or read_manifest(data_dir)
    split_size(manifest, split)
    return [data_dir.rstrip("/") + "/" + s for s in manifest["splits"][split]["shards"]]


class ManifestBuilder:
    """Collects per-split statistics and skipped inputs while converting."""

    def __init__(self, name: str, label_map: Sequence[str], extra: dict | None = None):
        self.name = name
        self.label_map = list(label_map)
        self.splits: dict[str, dict] = {}
        self.skipped: list[dict] = []
        self.frozen: list[dict] = []  # videos whose decoded frames are all identical
        self.extra = dict(extra or {})

    def add_split(self, split: str, shards: list[str], labels: Sequence[int],
                  num_frames: Sequence[int], shard_clips: Sequence[int] | None = None,
                  digests: Sequence[dict] | None = None) -> None:
        """``shard_clips``: clips written to each shard, so readers can count records
        lost to damage; ``digests``: each shard's ``{"bytes", "sha256"}`` (``framing.
        file_digest``), so ``--mode=verify`` finds a damaged shard without parsing it."""
        counts = np.bincount(np.asarray(labels, np.int64), minlength=len(self.label_map))
        nf = np.asarray(num_frames, np.int64) if len(num_frames) else np.zeros([0], np.int64)
        self.splits[split] = {
            "shards": list(shards),
            "num_clips": int(len(labels)),
            **({"shard_clips": [int(n) for n in shard_clips]} if shard_clips is not None else {}),
            **({"shard_bytes": [int(d["bytes"]) for d in digests],
                "shard_sha256": [d["sha256"] for d in digests]} if digests is not None else {}),
            "clips_per_class": {self.label_map[i]: int(c) for i, c in enumerate(counts)},
            "num_frames": {
                "min": int(nf.min()) if nf.size else 0,
                "max": int(nf.max()) if nf.size else 0,
                "mean": float(nf.mean()) if nf.size else 0.0,
            },
        }

    def skip(self, source: str, reason: str, split: str = "") -> None:
        self.skipped.append({"source": source, "reason": reason, "split": split})

    def write(self, data_dir: str) -> dict:
        manifest = {
            "name": self.name,
            "format": "stfusion_tf.clip.v1",
            "label_map": self.label_map,
            "num_classes": len(self.label_map),
            "splits": self.splits,
            "skipped": self.skipped,
            "num_skipped": len(self.skipped),
            "frozen": self.frozen,
            "num_frozen": len(self.frozen),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.extra,
        }
        files.write_json(os.path.join(data_dir, MANIFEST), manifest)
        return manifest
