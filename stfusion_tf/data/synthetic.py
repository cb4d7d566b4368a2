"""Embedded synthetic video datasets, generated from a seed: tasks whose right
answer for the probability space is known by construction.

``synthetic_motion`` (Something-Something-like: motion is the only signal)
  A sprite of random shape and colour travels with wrap-around (2-3 pixels
  per frame) over a static random periodic texture, in one of 8 compass
  directions; the direction is the class.  The sprite's start is uniform on
  the torus, so its position in any single frame is uniform whatever the
  class: every single frame has the same distribution for all classes, and
  reversing time maps a class to its opposite direction.  Only features that
  combine frames can tell classes apart.  Expected: T branches kept.

``synthetic_appearance`` (UCF/Kinetics-like: appearance is the signal)
  A full-frame texture whose kind is the class (horizontal stripes, vertical
  stripes, checkerboard, hexagonal dots; random period, phase and colours, all
  invariant to a horizontal flip), drifting in a random direction, with a
  sprite of random shape moving in another random direction: every single
  frame gives the class, motion is independent of it.  Spatial units suffice.
  Expected: T branches dropped where S branches can do their work.  (The
  earlier version, class = the shape of one 16-px sprite, stayed at chance
  with the tiny template: global average pooling over a 32-px crop dilutes one
  small shape below what 8x8 feature maps resolve; the texture spreads the
  evidence over the frame, as a scene does.)

``synthetic_fine_motion`` (motion visible only at the resolution of the lower layers)
  A random periodic texture drifts by three pixels per frame in the class
  direction.  Single frames carry no class information (the texture is
  stationary).  Its wavelengths (12-20 px on a 40-px frame) are long enough to
  survive the stem's 4x down-sampling (finer textures, tried first, alias away
  before any gated unit sees them and the task is not learnable), and short
  enough that feature maps pooled to 16-px cells or coarser -- the template's
  upper half -- no longer resolve the displacement.  Expected: T branches used
  more in the lower half of the network than in the upper half.

Clips are rendered deterministically from (seed, split, index), written through
the same writer as real datasets, and resumable shard by shard.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from stfusion_tf.data import framing, records
from stfusion_tf.errors import UserError

DIRECTIONS = ("east", "west", "south", "north", "southeast", "northwest", "southwest", "northeast")
#: (dy, dx) per direction; index i and i^1 are opposite, so time reversal maps i -> i^1.
_DIR_VEC = {"east": (0, 1), "west": (0, -1), "south": (1, 0), "north": (-1, 0),
            "southeast": (1, 1), "northwest": (-1, -1), "southwest": (1, -1),
            "northeast": (-1, 1)}
SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
TEXTURES = ("hstripes", "vstripes", "checker", "hexdots")
DATASETS = ("synthetic_motion", "synthetic_appearance", "synthetic_fine_motion")


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
            raise UserError(f"unknown synthetic dataset {self.name!r}; valid: {', '.join(DATASETS)}")
        limit = len(_LABELS[self.name])
        if not 2 <= self.num_classes <= limit:
            raise UserError(f"{self.name} supports 2..{limit} classes, got {self.num_classes}")

    @property
    def label_map(self) -> tuple[str, ...]:
        return _LABELS[self.name][: self.num_classes]

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
    return _finish(rng, np.stack(frames))


def render_motion_clip(rng: np.random.Generator, label: int, spec: SyntheticSpec) -> np.ndarray:
    """Class = direction of travel of a sprite of random shape and colour (static background)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    velocity = np.array(_DIR_VEC[DIRECTIONS[label]]) * int(rng.integers(2, 4))
    return _sprite_clip(rng, spec, shape, velocity, (0, 0))


def _contrast_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two colours at least 0.3 apart in every channel, in random order."""
    dark = rng.uniform(0.05, 0.45, 3)
    light = np.clip(dark + rng.uniform(0.3, 0.5, 3), 0, 1)
    return (light, dark) if rng.uniform() < 0.5 else (dark, light)


def texture_frame(kind: str, size: int, period: float, phase, offset, c1, c2) -> np.ndarray:
    """One frame [size, size, 3] of texture ``kind`` shifted by ``offset`` (dy, dx) pixels."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32) - offset[0],
                         np.arange(size, dtype=np.float32) - offset[1], indexing="ij")
    w = 2 * np.pi / period
    if kind == "hstripes":
        f = np.cos(w * yy + phase[0])
    elif kind == "vstripes":
        f = np.cos(w * xx + phase[0])
    elif kind == "checker":
        f = np.cos(w * yy + phase[0]) * np.cos(w * xx + phase[1])
    elif kind == "hexdots":  # three gratings 60 degrees apart
        angles, phases = (0, np.pi / 3, 2 * np.pi / 3), (phase[0], phase[1], -phase[0] - phase[1])
        f = np.clip(sum(np.cos(w * (xx * np.cos(a) + yy * np.sin(a)) + ph)
                        for a, ph in zip(angles, phases)) / 1.5, -1, 1)
    else:
        raise ValueError(kind)
    f = ((f + 1) / 2)[..., None]
    return (f * c1 + (1 - f) * c2).astype(np.float32)


def render_appearance_clip(rng: np.random.Generator, label: int, spec: SyntheticSpec) -> np.ndarray:
    """Class = texture kind; the texture drifts and a sprite moves, both at random."""
    kind, period = TEXTURES[label], rng.uniform(6, 12)
    phase = rng.uniform(0, 2 * np.pi, 2)
    c1, c2 = _contrast_colours(rng)
    drift = _random_velocity(rng) * rng.uniform(0.5, 1.5)
    sprite = max(6, spec.size * 3 // 10)
    canvas = np.zeros((spec.size, spec.size), np.float32)
    canvas[:sprite, :sprite] = _shape_mask(SHAPES[rng.integers(len(SHAPES))], sprite)
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    pos, velocity = rng.integers(0, spec.size, 2), _random_velocity(rng) * int(rng.integers(1, 3))
    frames = []
    for t in range(spec.num_frames):
        bg = texture_frame(kind, spec.size, period, phase, drift * t, c1, c2)
        m = np.roll(canvas, tuple(pos + velocity * t), axis=(0, 1))[..., None]
        frames.append(bg * (1 - m) + colour * m)
    return _finish(rng, np.stack(frames))


def render_fine_motion_clip(rng: np.random.Generator, label: int,
                            spec: SyntheticSpec) -> np.ndarray:
    """Class = direction of a 3-px-per-frame drift of a random periodic texture whose
    wavelengths (12-20 px on a 40-px frame) survive the stem's 4x down-sampling but
    average out in the 16-px cells of the upper half."""
    yy, xx = np.meshgrid(np.arange(spec.size), np.arange(spec.size), indexing="ij")
    field = np.zeros((spec.size, spec.size), np.float32)
    kmin, kmax = spec.size / 20.0, spec.size / 12.0  # wavenumbers: cycles per frame width
    for _ in range(8):
        while True:
            ky, kx = rng.integers(-int(kmax), int(kmax) + 1, 2)
            if kmin <= np.hypot(ky, kx) <= kmax:
                break
        field += np.cos(2 * np.pi * (ky * yy + kx * xx) / spec.size + rng.uniform(0, 2 * np.pi))
    field = ((field - field.min()) / (np.ptp(field) + 1e-6))[..., None]
    c1, c2 = _contrast_colours(rng)
    tex = (field * c1 + (1 - field) * c2).astype(np.float32)
    step = np.array(_DIR_VEC[DIRECTIONS[label]]) * 3
    return _finish(rng, np.stack([np.roll(tex, tuple(step * t), axis=(0, 1))
                                  for t in range(spec.num_frames)]))


def _finish(rng, frames: np.ndarray) -> np.ndarray:
    """Pixel noise (sigma 0.03) and uint8."""
    frames = frames + rng.normal(0, 0.03, frames.shape).astype(np.float32)
    return np.clip(frames * 255.0, 0, 255).astype(np.uint8)


_LABELS = {"synthetic_motion": DIRECTIONS, "synthetic_appearance": TEXTURES,
           "synthetic_fine_motion": DIRECTIONS}
_RENDER = {"synthetic_motion": render_motion_clip, "synthetic_appearance": render_appearance_clip,
           "synthetic_fine_motion": render_fine_motion_clip}


def render_clip(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, int]:
    """Clip ``index`` of ``split``: (uint8 [T,H,W,3], label).  Deterministic."""
    rng = _rng(spec.seed, split, index)
    label = index % spec.num_classes
    return _RENDER[spec.name](rng, label, spec), label


def prepare_synthetic(out_dir: str, spec: SyntheticSpec, log=print) -> dict:
    """Writes the dataset (shards + manifest) into ``out_dir``; resumes if interrupted."""
    os.makedirs(out_dir, exist_ok=True)
    builder = records.ManifestBuilder(
        spec.name, spec.label_map,
        extra={"synthetic": dataclasses.asdict(spec), "frame_size": spec.size})
    for split, n in spec.split_sizes().items():
        num_shards = max(1, -(-n // spec.clips_per_shard))
        shards, labels, shard_clips, digests = [], [], [], []
        for s in range(num_shards):
            name = records.shard_name(split, s, num_shards)
            shards.append(name)
            idx = range(s * spec.clips_per_shard, min(n, (s + 1) * spec.clips_per_shard))
            labels.extend(i % spec.num_classes for i in idx)
            shard_clips.append(len(idx))
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                digests.append(framing.file_digest(path))
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
            digests.append(framing.file_digest(path))
            log(f"wrote {path}")
        builder.add_split(split, shards, labels, [spec.num_frames] * len(labels), shard_clips,
                          digests)
    return builder.write(out_dir)
