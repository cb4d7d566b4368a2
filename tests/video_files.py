"""Writes small real video files with PyAV for converter tests."""

import av
import numpy as np

CODECS = {".mp4": "libx264", ".webm": "libvpx", ".avi": "mpeg4", ".mkv": "libx264"}


def frames(n=12, h=48, w=64, seed=0, still=False):
    """A texture moving 2 pixels per frame (``still``: the same frame n times)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 0 if still else 2 * t, axis=1) for t in range(n)])


def write_video(path, n=12, h=48, w=64, seed=0, fps=10, still=False):
    ext = "." + str(path).rsplit(".", 1)[-1]
    with av.open(str(path), "w") as c:
        s = c.add_stream(CODECS[ext], rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames(n, h, w, seed, still):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def write_frames_dir(path, n=8, h=48, w=64, seed=0):
    from PIL import Image
    import os
    os.makedirs(path, exist_ok=True)
    for i, f in enumerate(frames(n, h, w, seed), start=1):
        Image.fromarray(f).save(os.path.join(path, f"{i:05d}.jpg"))
    return str(path)
