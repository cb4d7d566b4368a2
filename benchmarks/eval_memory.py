"""Peak memory of multi-view evaluation input: views made one clip at a time
(``pipeline.eval_dataset``) vs all of a video's views in one tensor (the way the
pipeline made them before the evaluation protocols), in one run.

Each case runs in its own process on the same shards (synthetic videos stored at
``--size`` pixels), iterates the whole evaluation split with the ``10x3``
protocol (``--frames`` frames, 3 crops of ``--size``^2) and reports the
process's peak resident memory and its growth over the idle process.

    .venv/bin/python benchmarks/eval_memory.py          # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def whole_video_dataset(data_dir, split, cfg):
    """The previous evaluation input: every view of a video decoded, resized and cropped
    in one map call ([num_clips * num_crops, T, H, W, 3]), then unbatched."""
    import tensorflow as tf
    from official.vision.ops import preprocess_ops_3d as ops3d
    from stfusion_tf.data import pipeline, records

    def views(i, item):
        enc, label, _ = item
        frames = pipeline.decode_frames(pipeline.sample_frames(enc, cfg, training=False),
                                        cfg.num_clips * cfg.num_frames)
        frames = ops3d.resize_smallest(frames, cfg.eval_short_side)
        frames = tf.reshape(frames, tf.concat([[cfg.num_clips, cfg.num_frames],
                                               tf.shape(frames)[1:]], 0))
        out = []
        for c in range(cfg.num_clips):
            crops = ops3d.crop_image(frames[c], cfg.eval_crop, cfg.eval_crop, random=False,
                                     num_crops=cfg.num_crops)
            out.extend(pipeline._to_pixels(v) for v in tf.split(crops, cfg.num_crops, axis=0))
        n = cfg.num_views
        return tf.stack(out), tf.fill([n], label), tf.fill([n], tf.cast(i, tf.int32))

    ds = tf.data.TFRecordDataset(records.shard_paths(data_dir, split))
    ds = ds.map(pipeline.parse_clip).enumerate()
    ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


def run_case(case, data_dir, frames, size, batch):
    import tensorflow as tf  # noqa: F401
    from stfusion_tf.data import pipeline
    idle = _peak_mb()
    cfg = pipeline.InputConfig(num_frames=frames, crop_size=size, min_short_side=size,
                               max_short_side=size, eval_short_side=size, eval_protocol="10x3",
                               batch_size=batch)
    make = pipeline.eval_dataset if case == "per_clip" else whole_video_dataset
    t0, views = time.perf_counter(), 0
    for x, _, _ in make(data_dir, "val", cfg):
        views += int(x.shape[0])
    return {"case": case, "views": views, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(_peak_mb(), 1), "growth_mb": round(_peak_mb() - idle, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--video_frames", type=int, default=64)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.data_dir, args.frames, args.size, args.batch)))
        return
    from stfusion_tf.data import synthetic
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.prepare_synthetic(tmp, synthetic.SyntheticSpec(
            num_train=1, num_val=args.videos, num_test=1, num_frames=args.video_frames,
            size=args.size), log=lambda *a: None)
        results = []
        for case in ("per_clip", "whole_video"):
            cmd = [sys.executable, __file__, "--case", case, "--data_dir", tmp,
                   "--frames", str(args.frames), "--size", str(args.size),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"videos": args.videos, "protocol": "10x3", "frames": args.frames,
                      "size": args.size, "cpu_count": os.cpu_count(), "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
