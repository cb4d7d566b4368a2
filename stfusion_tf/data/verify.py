"""``--mode=verify``: find damaged shards of a dataset and repair them.

Every shard is checked against the manifest: its size and SHA-256 when the
manifest has them (a healthy shard costs one sequential read), else, and for any
shard whose checksum differs, its records are walked through their framing
(``framing.scan_records``): readable records are counted against the manifest's
``shard_clips`` and damaged byte ranges located.

Repairs (``repair``):

* ``source``: the damaged shards are deleted and written again from their source,
  by the same code and settings that wrote them (a synthetic dataset from its
  generator; a converted dataset from ``source_dir`` with the settings the
  manifest recorded).  Nothing is lost.
* ``drop``: each damaged shard is rewritten with the records that read; the lost
  records (media ids where the shard's original list is known, else byte ranges)
  are listed under ``skipped`` in the manifest, and the split's counts updated.
* ``auto``: ``source`` where possible, else ``drop``.  ``none``: report only.
"""

from __future__ import annotations

import dataclasses
import os

from stfusion_tf import files
from stfusion_tf.data import framing, records
from stfusion_tf.errors import UserError

REPAIRS = ("auto", "source", "drop", "none")


@dataclasses.dataclass
class ShardCheck:
    split: str
    index: int
    name: str
    expected: int
    readable: int = 0
    damaged: list = dataclasses.field(default_factory=list)  # [(start, end) bytes]
    problem: str = ""  # empty: healthy

    def line(self) -> str:
        return f"{self.name}: {self.problem}"


def check_shard(data_dir: str, manifest: dict, split: str, index: int) -> ShardCheck:
    entry = manifest["splits"][split]
    name = entry["shards"][index]
    counts = entry.get("shard_clips")
    c = ShardCheck(split, index, name, counts[index] if counts else -1)
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        c.problem = "missing"
        return c
    if "shard_sha256" in entry:
        digest = framing.file_digest(path)
        if digest == {"bytes": entry["shard_bytes"][index], "sha256": entry["shard_sha256"][index]}:
            c.readable = c.expected
            return c
    for kind, start, end in framing.scan_records(path):
        if kind == "record":
            c.readable += 1
        else:
            c.damaged.append((start, end))
    if c.damaged:
        ranges = ", ".join(f"{s}-{e}" for s, e in c.damaged[:3])
        c.problem = (f"{c.expected - c.readable} of {c.expected} records damaged "
                     f"(bytes {ranges})")
    elif c.expected >= 0 and c.readable != c.expected:
        c.problem = f"{c.readable} records, the manifest says {c.expected}"
    elif "shard_sha256" in entry:
        c.problem = "every record reads, but the file differs from the manifest's checksum"
    return c


def check(data_dir: str, manifest: dict) -> list[ShardCheck]:
    """Every shard of every split, checked."""
    return [check_shard(data_dir, manifest, split, i)
            for split, entry in sorted(manifest["splits"].items())
            for i in range(len(entry["shards"]))]


def _original_shard(manifest: dict, data_dir: str, split: str, index: int) -> tuple | None:
    """(media ids, labels) the shard was written with, where known: a synthetic
    dataset's from its generator settings, a converted one's from the shard's sidecar."""
    entry = manifest["splits"][split]
    if "synthetic" in manifest:
        spec = manifest["synthetic"]
        per, total = spec["clips_per_shard"], spec[f"num_{split}"]
        idx = range(index * per, min(total, (index + 1) * per))
        return ([f"{manifest['name']}/{split}/{i:06d}" for i in idx],
                [i % manifest["num_classes"] for i in idx])
    side = os.path.join(data_dir, entry["shards"][index] + ".json")
    try:
        side = files.read_json(side)
    except (OSError, ValueError):
        return None
    if "media_ids" not in side:
        return None
    return side["media_ids"], side["labels"]


def _parse(record: bytes) -> tuple[str, int, int] | None:
    """(media id, label, frames) of one record (protobuf only); None if it is no clip."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2
    try:
        ex = example_pb2.SequenceExample.FromString(record)
        ctx = ex.context.feature
        return (ctx[records.MEDIA_ID_KEY].bytes_list.value[0].decode(),
                int(ctx[records.LABEL_KEY].int64_list.value[0]),
                len(ex.feature_lists.feature_list[records.IMAGE_KEY].feature))
    except (DecodeError, IndexError, UnicodeDecodeError):
        return None


def drop_damaged(data_dir: str, manifest: dict, shard: ShardCheck) -> dict:
    """Rewrites ``shard`` with the records that read and updates ``manifest`` (returned,
    not written): counts, and the lost records under ``skipped``."""
    path = os.path.join(data_dir, shard.name)
    readable = framing.readable_records(path) if os.path.exists(path) else []
    kept = [(meta, r) for meta, r in ((_parse(r), r) for r in readable) if meta is not None]
    records.write_shard(path, (r for _, r in kept))
    entry = manifest["splits"][shard.split]
    original = _original_shard(manifest, data_dir, shard.split, shard.index)
    known = {meta[0] for meta, _ in kept} | {s["source"] for s in manifest["skipped"]}
    lost = shard.expected - len(kept)
    if original is not None:
        gone = [(m, lab) for m, lab in zip(*original) if m not in known]
        for media_id, label in gone:
            name = manifest["label_map"][label]
            entry["clips_per_class"][name] = max(entry["clips_per_class"].get(name, 0) - 1, 0)
        lost_items = [m for m, _ in gone]
    else:
        lost_items = [f"{shard.name} bytes {s}-{e}" for s, e in shard.damaged] or [shard.name]
    for item in lost_items:
        manifest["skipped"].append({"source": item, "split": shard.split, "reason":
                                    f"damaged record in {shard.name}, dropped by --mode=verify"})
    manifest["num_skipped"] = len(manifest["skipped"])
    entry["shard_clips"][shard.index] = len(kept)
    entry["num_clips"] = int(entry["num_clips"]) - max(lost, 0)
    digest = framing.file_digest(path)
    entry.setdefault("shard_bytes", [0] * len(entry["shards"]))[shard.index] = digest["bytes"]
    entry.setdefault("shard_sha256", [""] * len(entry["shards"]))[shard.index] = digest["sha256"]
    manifest.setdefault("repairs", []).append(
        {"shard": shard.name, "dropped": max(lost, 0), "kept": len(kept)})
    _update_sidecar(path, kept, lost_items, digest)
    return manifest


def _update_sidecar(path: str, kept, lost_items, digest) -> None:
    """A converted shard's sidecar follows its shard, so a later --mode=prepare agrees."""
    side_path = path + ".json"
    if not os.path.exists(side_path):
        return
    side = files.read_json(side_path)
    side.update(labels=[m[1] for m, _ in kept], media_ids=[m[0] for m, _ in kept],
                num_frames=[m[2] for m, _ in kept], **digest)
    side["skipped"] = side.get("skipped", []) + [
        {"source": item, "reason": "damaged record, dropped by --mode=verify"}
        for item in lost_items]
    files.write_json(side_path, side)


def can_rewrite(manifest: dict, source_dir: str | None) -> str | None:
    """None when damaged shards can be written again from their source, else why not."""
    if "synthetic" in manifest:
        return None
    if not source_dir:
        return "no --source_dir given"
    if "prepare" not in manifest:
        return "the manifest does not record the settings it was prepared with"
    return None


def rewrite(data_dir: str, manifest: dict, bad: list[ShardCheck], source_dir: str | None,
            log=print) -> dict:
    """Deletes the ``bad`` shards and writes them again from their source (the same
    writer that skips finished shards); returns the new manifest."""
    for shard in bad:
        for path in (os.path.join(data_dir, shard.name),
                     os.path.join(data_dir, shard.name + ".json")):
            if os.path.exists(path):
                os.remove(path)
    if "synthetic" in manifest:
        from stfusion_tf.data import synthetic
        spec = synthetic.SyntheticSpec(**manifest["synthetic"])
        return synthetic.prepare_synthetic(data_dir, spec, log=log)
    from stfusion_tf.data import convert
    settings = manifest["prepare"]
    return convert.prepare(manifest["source_layout"], source_dir, data_dir,
                           short_side=manifest["short_side"], log=log, **settings)


def verify(data_dir: str, repair: str = "auto", source_dir: str | None = None,
           log=print) -> dict:
    """Checks every shard of ``data_dir`` and repairs the damaged ones; returns
    ``{"shards", "damaged": [lines], "repaired": how, "lost": records}``."""
    if repair not in REPAIRS:
        raise UserError(f"repair={repair!r}; valid values: {', '.join(REPAIRS)}")
    if "://" in data_dir:
        raise UserError(f"--mode=verify needs a local --data_dir, not {data_dir}")
    manifest = records.read_manifest(data_dir)
    checks = check(data_dir, manifest)
    bad = [c for c in checks if c.problem]
    out = {"shards": len(checks), "damaged": [c.line() for c in bad], "repaired": "", "lost": 0,
           "remaining": [c.line() for c in bad]}
    for c in bad:
        log(f"[verify] {data_dir}/{c.line()}")
    if not bad or repair == "none":
        return out
    why_not = can_rewrite(manifest, source_dir)
    if repair == "source" and why_not:
        raise UserError(f"cannot rewrite damaged shards from their source: {why_not}; "
                        "use --repair=drop to keep only their readable records")
    if repair in ("source", "auto") and not why_not:
        manifest = rewrite(data_dir, manifest, bad, source_dir, log=lambda m: None)
        out["repaired"] = "source"
    else:
        unfixable = [c for c in bad if not c.damaged and c.readable == c.expected]
        for c in bad:
            if c not in unfixable:
                manifest = drop_damaged(data_dir, manifest, c)
                out["lost"] += max(c.expected - c.readable, 0)
        files.write_json(os.path.join(data_dir, records.MANIFEST), manifest)
        out["repaired"] = "drop"
    out["remaining"] = [c.line() for c in check(data_dir, manifest) if c.problem]
    return out


def summary_line(data_dir: str, out: dict) -> str:
    """The one line ``--mode=verify`` ends with."""
    bad = len(out["damaged"])
    if not bad:
        return f"[verify] {data_dir}: {out['shards']} shards, all healthy"
    how = {"source": "written again from their source",
           "drop": f"rewritten without their {out['lost']} damaged record(s) (listed in "
                   f"{records.MANIFEST})",
           "": "not repaired (--repair=none)"}[out["repaired"]]
    return (f"[verify] {data_dir}: {out['shards']} shards, {bad} damaged, {how}; "
            f"{len(out['remaining'])} still damaged")
