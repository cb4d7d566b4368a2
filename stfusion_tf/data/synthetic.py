"""Embedded synthetic video datasets, generated from a seed.

``synthetic_motion`` (Something-Something-like: motion is the only signal)
  A sprite of random shape and colour travels with wrap-around (2-3 pixels
  per frame) over a static random periodic texture, in one of 8 compass
  directions; the direction is the class.  The sprite's start is uniform on
  the torus, so its position in any single frame is uniform whatever the
  class: every single frame has the same distribution for all classes, and
  reversing time maps a class to its opposite direction.  Only features that
  combine frames can tell classes apart.

``synthetic_appearance`` (UCF/Kinetics-like: appearance is the signal)
  A sprite whose shape is the class (disc, square, triangle, cross, ring,
  diamond, bars) with a random colour, on a random texture; sprite and
  background move in random directions, independent of the class.  Spatial
  units suffice.

Clips are rendered deterministically from (seed, split, index), written through
the same writer as real datasets, and resumable shard by shard.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from stfusion_tf.data import records

DIRECTIONS = ("east", "west", "south", "north", "southeast", "northwest", "southwest", "northeast")
#: (dy, dx) per direction; index i and i^1 are opposite, so time reversal maps i -> i^1.
_DIR_VEC = {"east": (0, 1), "west": (0, -1), "south": (1, 0), "north": (-1, 0),
            "southeast": (1, 1), "northwest": (-1, -1), "southwest": (1, -1),
            "northeast": (-1, 1)}
SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
DATASETS = ("synthetic_motion", "synthetic_appearance")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Size of a synthetic dataset; the defaults fit the tiny template."""

    name: str = "synthetic_motion"
    num_classes: int = 4
    num_train: int = 256
    num_val: int = 64
    num_test: int = 64
    num_frames: int = 16
    size: int = 40
    seed: int = 0
    clips_per_shard: int = 64

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"unknown synthetic dataset {self.name!r}; valid: {', '.join(DATASETS)}")
        limit = len(DIRECTIONS) if self.name == "synthetic_motion" else len(SHAPES)
        if not 2 <= self.num_classes <= limit:
            raise ValueError(f"{self.name} supports 2..{limit} classes, got {self.num_classes}")

    @property
    def label_map(self) -> tuple[str, ...]:
        src = DIRECTIONS if self.name == "synthetic_motion" else SHAPES
        return src[: self.num_classes]

    def split_sizes(self) -> dict:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    return np.random.default_rng([seed, split_id, index])


def periodic_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A stationary periodic colour texture, float32 [size, size, 3] in [0, 1].

    Sum of random Fourier modes on the torus: every circular shift of it has
    the same distribution.
    """
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    field = np.zeros((size, size), np.float32)
    for _ in range(6):
        ky, kx = rng.integers(-4, 5, size=2)
        if ky == 0 and kx == 0:
            kx = 1
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.5, 1.0) / np.hypot(ky, kx) ** 0.5
        field += amp * np.cos(2 * np.pi * (ky * yy + kx * xx) / size + phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    c1, c2 = rng.uniform(0, 1, size=(2, 3))
    return (field[..., None] * c1 + (1 - field[..., None]) * c2).astype(np.float32)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    r = size / 2.0
    yy, xx = np.meshgrid(np.arange(size) - r + 0.5, np.arange(size) - r + 0.5, indexing="ij")
    d = np.hypot(yy, xx)
    if shape == "disc":
        m = d < r * 0.9
    elif shape == "square":
        m = (np.abs(yy) < r * 0.75) & (np.abs(xx) < r * 0.75)
    elif shape == "triangle":
        m = (yy < r * 0.7) & (yy > -r * 0.8) & (np.abs(xx) < (yy + r * 0.8) * 0.6)
    elif shape == "cross":
        m = (np.abs(yy) < r * 0.25) | (np.abs(xx) < r * 0.25)
    elif shape == "ring":
        m = (d < r * 0.9) & (d > r * 0.5)
    elif shape == "diamond":
        m = (np.abs(yy) + np.abs(xx)) < r * 0.9
    elif shape == "hbar":
        m = (np.abs(yy) < r * 0.3) & (np.abs(xx) < r * 0.95)
    elif shape == "vbar":
        m = (np.abs(xx) < r * 0.3) & (np.abs(yy) < r * 0.95)
    else:
        raise ValueError(shape)
    return m.astype(np.float32)


def _random_velocity(rng) -> np.ndarray:
    vec = np.array(_DIR_VEC[DIRECTIONS[rng.integers(len(DIRECTIONS))]])
    return vec * rng.integers(1, 3)


def _sprite_clip(rng, spec: SyntheticSpec, shape: str, velocity, bg_velocity) -> np.ndarray:
    """A random-colour sprite moving with wrap-around over a periodic texture."""
    tex = periodic_texture(rng, spec.size) * 0.6 + 0.2
    sprite = max(8, spec.size * 2 // 5)
    canvas = np.zeros((spec.size, spec.size), np.float32)
    canvas[:sprite, :sprite] = _shape_mask(shape, sprite)
    colour = rng.uniform(0, 1, size=3).astype(np.float32)
    pos = rng.integers(0, spec.size, size=2)
    frames = []
    for t in range(spec.num_frames):
        bg = np.roll(tex, tuple(np.asarray(bg_velocity) * t), axis=(0, 1))
        m = np.roll(canvas, tuple(pos + np.asarray(velocity) * t), axis=(0, 1))[..., None]
        frames.append(bg * (1 - m) + colour * m)
    frames = np.stack(frames)
    frames = frames + rng.normal(0, 0.03, frames.shape).astype(np.float32)
    return np.clip(frames * 255.0, 0, 255).astype(np.uint8)


def render_motion_clip(rng: np.random.Generator, label: int, spec: SyntheticSpec) -> np.ndarray:
    """Class = direction of travel of a sprite of random shape and colour (static background)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    velocity = np.array(_DIR_VEC[DIRECTIONS[label]]) * int(rng.integers(2, 4))
    return _sprite_clip(rng, spec, shape, velocity, (0, 0))


def render_appearance_clip(rng: np.random.Generator, label: int, spec: SyntheticSpec) -> np.ndarray:
    """Class = sprite shape; sprite and background motion are random, class-independent."""
    return _sprite_clip(rng, spec, SHAPES[label], _random_velocity(rng) * int(rng.integers(1, 3)),
                        _random_velocity(rng) // 2)


def render_clip(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, int]:
    """Clip ``index`` of ``split``: (uint8 [T,H,W,3], label).  Deterministic."""
    rng = _rng(spec.seed, split, index)
    label = index % spec.num_classes
    render = render_motion_clip if spec.name == "synthetic_motion" else render_appearance_clip
    return render(rng, label, spec), label


def prepare_synthetic(out_dir: str, spec: SyntheticSpec, log=print) -> dict:
    """Writes the dataset (shards + manifest) into ``out_dir``; resumes if interrupted."""
    os.makedirs(out_dir, exist_ok=True)
    builder = records.ManifestBuilder(
        spec.name, spec.label_map,
        extra={"synthetic": dataclasses.asdict(spec), "frame_size": spec.size})
    for split, n in spec.split_sizes().items():
        num_shards = max(1, -(-n // spec.clips_per_shard))
        shards, labels, shard_clips = [], [], []
        for s in range(num_shards):
            name = records.shard_name(split, s, num_shards)
            shards.append(name)
            idx = range(s * spec.clips_per_shard, min(n, (s + 1) * spec.clips_per_shard))
            labels.extend(i % spec.num_classes for i in idx)
            shard_clips.append(len(idx))
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                continue

            def gen(idx=idx, split=split):
                for i in idx:
                    frames, label = render_clip(spec, split, i)
                    yield records.make_sequence_example(
                        [records.encode_jpeg(f) for f in frames], label, spec.label_map[label],
                        media_id=f"{spec.name}/{split}/{i:06d}", frame_rate=25.0,
                        source=f"synthetic:{spec.seed}:{split}:{i}",
                        original_size=(spec.size, spec.size))

            records.write_shard(path, gen())
            log(f"wrote {path}")
        builder.add_split(split, shards, labels, [spec.num_frames] * len(labels), shard_clips)
    return builder.write(out_dir)
