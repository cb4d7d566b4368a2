"""tf.data input pipeline over clip shards.

Frame sampling, resizing, cropping and flipping use Model Garden's
``official.vision.ops.preprocess_ops_3d`` so that the clip preprocessing matches
the reference video pipeline; only the sampled frames are decoded, one op per
frame (``decode_frames``).  Frames are sampled densely (``sampling="dense"``: consecutive frames
with a stride) or TSN-style (``"segments"``: the video cut into ``num_frames``
equal segments, one frame from each, at random in training and at the segment
centre in evaluation).  Training: frames from a random start (dense),
short side resized to a random size in [min_short_side, max_short_side], random
crop (only the crop window is resized), optional flip.  Clips leave the pipeline as
uint8 pixels: the network casts and normalises them.

Evaluation follows a named protocol (``EVAL_PROTOCOLS``): ``num_clips`` evenly
spaced clips per video, short side resized to ``eval_short_side``, centre (or
3) square crops of ``eval_crop``; every view of a video carries the video's
index so scores can be averaged per video.  Views are made one clip at a time
(a clip's frames decoded, resized and cropped), never a whole video's at once,
so 10 clips x 3 crops of 16 x 256^2 frames hold one clip's frames in memory
per parallel call.

=========  =====  =====  ==================  ======================================
protocol   clips  crops  crop                use
=========  =====  =====  ==================  ======================================
authors    1      1      eval_short_side^2   the authors' strategy selection
paper      2      1      eval_short_side^2   the authors' ``test()`` (paper Tables)
10x3       10     3      eval_short_side^2   the common video-library test protocol
custom     flags  flags  eval_crop_size      (default: one crop_size centre crop)
=========  =====  =====  ==================  ======================================

Optional training augmentation (``data/augment.py``, off by default as in the
paper): RandAugment drawn once per clip (``randaugment="N,M"``), and mixup /
cutmix (``mixup_alpha`` / ``cutmix_alpha``) with one mixing per clip, after
which clips leave as float32 and labels as soft one-hot rows.
"""

from __future__ import annotations

import dataclasses
import threading

import tensorflow as tf
from absl import logging
from official.vision.ops import preprocess_ops_3d as ops3d

from stfusion_tf.data import augment, framing, records
from stfusion_tf.errors import UserError

SAMPLINGS = ("dense", "segments")
NUM_CROPS = (1, 3)
EVAL_PROTOCOLS = ("authors", "paper", "10x3", "custom")
#: Named protocol -> (clips, crops); their crop is the full evaluation frame, a square of
#: side ``eval_short_side`` (the authors' 256 x 256 centre of a 256 short side).
PROTOCOL_VIEWS = {"authors": (1, 1), "paper": (2, 1), "10x3": (10, 3)}


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How clips are sampled and augmented, and the evaluation protocol.

    A named ``eval_protocol`` fixes ``num_clips``, ``num_crops`` and
    ``eval_crop_size`` (set here from ``PROTOCOL_VIEWS``); ``custom`` takes them
    as given (``eval_crop_size`` 0: ``crop_size``)."""

    num_frames: int = 8
    stride: int = 1
    crop_size: int = 32
    min_short_side: int = 36
    max_short_side: int = 44
    eval_short_side: int = 40
    flip: bool = False
    num_clips: int = 1
    num_crops: int = 1
    temporal_pool: bool = False
    sampling: str = "dense"
    batch_size: int = 8
    shuffle_buffer: int = 256
    seed: int | None = None
    eval_protocol: str = "custom"
    eval_crop_size: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    randaugment: str = ""  # "N,M": N ops per clip at magnitude M

    def __post_init__(self):
        if self.eval_protocol not in EVAL_PROTOCOLS:
            raise UserError(f"eval_protocol={self.eval_protocol!r}; valid values: "
                            f"{', '.join(EVAL_PROTOCOLS)}")
        if self.eval_protocol in PROTOCOL_VIEWS:
            clips, crops = PROTOCOL_VIEWS[self.eval_protocol]
            object.__setattr__(self, "num_clips", clips)
            object.__setattr__(self, "num_crops", crops)
            object.__setattr__(self, "eval_crop_size", self.eval_short_side)
        if self.num_clips < 1:
            raise UserError(f"num_clips must be >= 1, got {self.num_clips}")
        if not 0 <= self.eval_crop_size <= self.eval_short_side:
            raise UserError(f"eval_crop_size={self.eval_crop_size} must be at most "
                            f"eval_short_side={self.eval_short_side}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise UserError("mixup_alpha and cutmix_alpha must be >= 0 (0: off)")
        try:
            augment.parse_randaugment(self.randaugment)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.sampling not in SAMPLINGS:
            raise UserError(f"sampling={self.sampling!r}; valid values: {', '.join(SAMPLINGS)}")
        if self.num_crops not in NUM_CROPS:
            raise UserError(f"num_crops={self.num_crops}; valid values: "
                            f"{', '.join(map(str, NUM_CROPS))}")
        if self.min_short_side > self.max_short_side:
            raise UserError("min_short_side must be <= max_short_side")
        if min(self.min_short_side, self.eval_short_side) < self.crop_size:
            raise UserError("min_short_side and eval_short_side must be >= crop_size")
        if self.temporal_pool and self.num_frames < 3:
            raise UserError("temporal_pool needs num_frames >= 3")

    @property
    def eval_crop(self) -> int:
        """Side of the square evaluation crops."""
        return self.eval_crop_size or self.crop_size

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or cutmix): labels become soft."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def model_frames(self) -> int:
        """Frames the network sees (after optional temporal pooling)."""
        if self.temporal_pool:
            return (self.num_frames - 3) // 2 + 1
        return self.num_frames


def with_protocol(cfg: InputConfig, name: str) -> InputConfig:
    """``cfg`` evaluated with the named protocol ``name`` (one of ``PROTOCOL_VIEWS``)."""
    if name not in PROTOCOL_VIEWS:
        raise UserError(f"protocol {name!r}; valid named protocols: {', '.join(PROTOCOL_VIEWS)}")
    return dataclasses.replace(cfg, eval_protocol=name)


def protocol(cfg: InputConfig) -> dict:
    """The evaluation protocol of ``cfg``: what every accuracy it gives is measured on.

    Clip-level accuracy scores each view alone; video-level averages the softmax of
    a video's ``clips x crops`` views."""
    frames = f"{cfg.num_frames}" + (f" pooled to {cfg.model_frames}" if cfg.temporal_pool else "")
    sampling = (f"stride {cfg.stride}" if cfg.sampling == "dense" else "TSN segments")
    label = (f"{cfg.eval_protocol}: {frames} frames ({sampling}) x {cfg.num_clips} clip"
             f"{'s' if cfg.num_clips > 1 else ''} x {cfg.num_crops} crop"
             f"{'s' if cfg.num_crops > 1 else ''} of {cfg.eval_crop}x{cfg.eval_crop} "
             f"(short side {cfg.eval_short_side})")
    return {"name": cfg.eval_protocol, "frames": cfg.num_frames, "model_frames": cfg.model_frames,
            "sampling": cfg.sampling, "frame_stride": cfg.stride, "clips": cfg.num_clips,
            "crops": cfg.num_crops, "crop_size": cfg.eval_crop, "short_side": cfg.eval_short_side,
            "label": label}


class InputStats:
    """Counts what the training pipeline drops as corrupt.

    * A corrupt frame makes its clip fail to decode; ``ignore_errors`` drops the
      clip, and ``attempted - decoded`` counts such clips.
    * A damaged record (CRC error, cut file) costs that record only: the rest of its
      shard is read by resynchronising on the record framing (``framing``), and the
      records each read of a shard could not deliver, against the manifest's clip
      count of the shard, are added to ``lost_records``.
    """

    def __init__(self):
        self.attempted = tf.Variable(0, dtype=tf.int64, trainable=False, name="clips_attempted")
        self.decoded = tf.Variable(0, dtype=tf.int64, trainable=False, name="clips_decoded")
        self._lost = 0
        self._lock = threading.Lock()

    def add_lost(self, n: int) -> None:
        with self._lock:
            self._lost += n

    @property
    def dropped(self) -> int:
        """Clips dropped for corrupt frames."""
        return int(self.attempted.numpy() - self.decoded.numpy())

    @property
    def lost_records(self) -> int:
        """Records lost to damage (only the damaged records themselves)."""
        with self._lock:
            return self._lost


def parse_clip(serialized):
    """Parses one record into (encoded frames [N] string, label int32, media_id)."""
    context, seq = tf.io.parse_single_sequence_example(
        serialized,
        context_features={
            records.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
            records.MEDIA_ID_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        },
        sequence_features={records.IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string)})
    return seq[records.IMAGE_KEY], tf.cast(context[records.LABEL_KEY], tf.int32), \
        context[records.MEDIA_ID_KEY]


def temporal_pool(frames):
    """Average pooling over time, window 3 and stride 2 (supplement Fig. 6)."""
    x = tf.cast(frames, tf.float32)[None]
    x = tf.nn.avg_pool3d(x, ksize=[1, 3, 1, 1, 1], strides=[1, 2, 1, 1, 1], padding="VALID")
    return x[0]


def segment_indices(num_available, num_segments: int, offsets):
    """TSN sampling: frame index in each of ``num_segments`` equal segments.

    ``offsets`` in [0, 1) is the position inside each segment ([num_segments],
    or a scalar for all).  Videos shorter than ``num_segments`` repeat frames.
    """
    n = tf.cast(num_available, tf.float32)
    length = n / num_segments
    starts = tf.range(num_segments, dtype=tf.float32) * length
    idx = tf.cast(tf.floor(starts + tf.cast(offsets, tf.float32) * length), tf.int32)
    return tf.clip_by_value(idx, 0, tf.cast(num_available, tf.int32) - 1)


def sample_frames(encoded, cfg: InputConfig, training: bool):
    """Encoded frames of the clip(s) to decode: [num_frames] in training,
    [num_clips * num_frames] in evaluation."""
    if cfg.sampling == "segments":
        n = tf.shape(encoded)[0]
        if training:
            offsets = tf.random.uniform([cfg.num_frames], 0, 1, seed=cfg.seed)
            return tf.gather(encoded, segment_indices(n, cfg.num_frames, offsets))
        idx = [segment_indices(n, cfg.num_frames, (c + 0.5) / cfg.num_clips)
               for c in range(cfg.num_clips)]
        return tf.gather(encoded, tf.concat(idx, 0))
    if training:
        return ops3d.sample_sequence(encoded, cfg.num_frames, random=True, stride=cfg.stride,
                                     seed=cfg.seed)
    return ops3d.sample_linspace_sequence(encoded, cfg.num_clips, cfg.num_frames, cfg.stride)


def decode_frames(encoded, count: int, decode=None):
    """Decodes the ``count`` frames of ``encoded`` with one op per frame.

    A static unroll: inside tf.data, ``tf.map_fn``'s while loop (as in Model
    Garden's ``decode_jpeg``) measured about twice the wall time per clip for the
    same CPU time.  ``decode`` maps one JPEG string to pixels (default: full RGB).
    """
    decode = decode or (lambda e: tf.io.decode_jpeg(e, channels=3))
    return tf.stack([decode(encoded[i]) for i in range(count)])


def _to_pixels(frames):
    """uint8 pixels: a quarter of float32's bytes through tf.data and batching; the
    network casts and normalises them (model/normalization.py)."""
    if frames.dtype == tf.uint8:
        return frames
    return tf.cast(tf.clip_by_value(tf.round(frames), 0, 255), tf.uint8)


def _decode_random_crop(sampled, cfg: InputConfig):
    """Scale jitter + random crop.

    Resizing the short side to s in [min_short_side, max_short_side] and cropping
    ``crop_size`` equals cropping a window of crop_size * short / s pixels of the
    original and resizing it to ``crop_size``: only the window is resized, and not
    at all when s is the stored short side.  Frames are decoded whole, then
    sliced: ``decode_and_crop_jpeg`` still entropy-decodes the skipped rows and
    measured ~10% slower per clip at 128 px (benchmarks/input_pipeline.py).
    """
    frames = decode_frames(sampled, cfg.num_frames)
    shape = tf.shape(frames)
    h, w = shape[1], shape[2]
    short = tf.minimum(h, w)
    target = tf.random.uniform((), cfg.min_short_side, cfg.max_short_side + 1, tf.int32, seed=cfg.seed)
    win = tf.cast(tf.round(cfg.crop_size * tf.cast(short, tf.float32) / tf.cast(target, tf.float32)), tf.int32)
    win = tf.clip_by_value(win, 1, short)
    oy = tf.random.uniform((), 0, h - win + 1, tf.int32, seed=cfg.seed)
    ox = tf.random.uniform((), 0, w - win + 1, tf.int32, seed=cfg.seed)
    frames = frames[:, oy:oy + win, ox:ox + win]
    return tf.cond(tf.equal(win, cfg.crop_size), lambda: frames,
                   lambda: tf.cast(tf.round(tf.image.resize(frames, [cfg.crop_size, cfg.crop_size])), tf.uint8))


def preprocess_train(encoded, cfg: InputConfig):
    frames = _decode_random_crop(sample_frames(encoded, cfg, training=True), cfg)
    if cfg.flip:
        frames = ops3d.random_flip_left_right(frames, seed=cfg.seed)
    ra = augment.parse_randaugment(cfg.randaugment)
    if ra:
        frames = augment.randaugment_clip(_to_pixels(frames), *ra)
    if cfg.temporal_pool:
        frames = temporal_pool(frames)
    frames = _to_pixels(frames)
    frames.set_shape((cfg.model_frames, cfg.crop_size, cfg.crop_size, 3))
    return frames


def preprocess_eval_clip(encoded, cfg: InputConfig):
    """The views of one evaluation clip: ``num_frames`` encoded frames decoded, short
    side resized to ``eval_short_side``, ``num_crops`` square crops of ``eval_crop``
    -> [num_crops, T, H, W, 3] uint8."""
    frames = decode_frames(encoded, cfg.num_frames)
    frames = ops3d.resize_smallest(frames, cfg.eval_short_side)
    crops = ops3d.crop_image(frames, cfg.eval_crop, cfg.eval_crop, random=False,
                             num_crops=cfg.num_crops)
    views = []
    for v in tf.split(crops, cfg.num_crops, axis=0):
        if cfg.temporal_pool:
            v = temporal_pool(v)
        views.append(_to_pixels(v))
    out = tf.stack(views)
    out.set_shape((cfg.num_crops, cfg.model_frames, cfg.eval_crop, cfg.eval_crop, 3))
    return out


def _read_shard(path):
    return tf.data.TFRecordDataset(path).ignore_errors(log_warning=True)


_WARNED: set = set()


def _rest_of_shard(path: bytes, seen, expected, stats: InputStats | None):
    """The records of a shard after the ``seen`` that ``TFRecordDataset`` read before a
    damaged record stopped it: every one that reads, found through the framing."""
    path, seen, expected = path.decode(), int(seen), int(expected)
    got = 0
    try:
        for record in framing.readable_records(path, skip=seen):
            got += 1
            yield record
    except (tf.errors.OpError, OSError) as e:  # the shard is gone or unreadable
        logging.warning("%s: %s", path, e)
    lost = max(expected - seen - got, 0)
    if stats is not None:
        stats.add_lost(lost)
    if path not in _WARNED:  # once per shard: InputHealth reports the counts every epoch
        _WARNED.add(path)
        logging.warning("%s: %d damaged record(s) skipped, %d of %d read; --mode=verify "
                        "repairs the shard", path, lost, seen + got, expected)


def _records(files, training: bool, seed, repeat: bool = False,
             stats: InputStats | None = None, expected=None):
    """Records of ``files``: shard order shuffled in training, repeated at the
    file level so the interleave never restarts (no pipeline bubble per epoch).

    With the shards' ``expected`` clip counts, every read counts what ``TFRecordDataset``
    delivers (in a table keyed by a per-read id, so concurrent reads of one shard never
    mix); a read that ends short (a damaged record stops ``TFRecordDataset``) goes on
    past the damage with ``framing`` (Python, damaged shards only) and adds the records
    it could not read to ``stats``.  With ``expected=None`` (the tf.data service, which
    cannot run Python) a damaged record ends its shard's read.
    """
    cycle = min(4, len(files))
    resync = expected is not None and len(expected) == len(files)
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant(expected if resync else [0] * len(files), tf.int64)))
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if not resync:
        return ds.interleave(lambda path, n: _read_shard(path), cycle_length=cycle,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    seen = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)

    def read(read_id, item):
        path, n = item

        def count(record):  # a sequential map (stateful): one read-modify-write per record
            with tf.control_dependencies([seen.insert(read_id, seen.lookup(read_id) + 1)]):
                return tf.identity(record)

        def rest(read_id):
            k = seen.lookup(read_id)
            with tf.control_dependencies([seen.remove(read_id[None])]):
                take = tf.where(k < n, tf.constant(-1, tf.int64), 0)
            return tf.data.Dataset.from_generator(
                lambda p, k, n: _rest_of_shard(p, k, n, stats), args=(path, k, n),
                output_signature=tf.TensorSpec([], tf.string)).take(take)

        fast = _read_shard(path).map(count)
        return fast.concatenate(tf.data.Dataset.from_tensors(read_id).flat_map(rest))

    return ds.enumerate().interleave(read, cycle_length=cycle,
                                     num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=not training)


def train_dataset(data_dir: str, split: str, cfg: InputConfig, repeat: bool = True,
                  data_service: str | None = None, stats: InputStats | None = None,
                  resync: bool = True, one_hot: bool = False) -> tf.data.Dataset:
    """(clips [B,T,H,W,3] uint8, labels [B] int32), shuffled and repeated.

    With ``one_hot`` or mixing (``cfg.mixes``) labels are [B, classes] float32
    rows that sum to 1 (mixing also makes the clips float32).  With
    ``data_service`` (grpc://host:port) the pipeline runs on tf.data service
    workers; ``stats`` (local pipelines only) counts clips dropped as corrupt and
    records lost to damage.  ``resync``: read past damaged records (local pipelines
    only; see ``_records``).
    """
    manifest = records.read_manifest(data_dir)  # also registers tensorflow-io for URLs
    files = records.shard_paths(data_dir, split, manifest)
    if data_service:
        stats, resync = None, False
    expected = records.shard_clip_counts(data_dir, split, manifest) if resync else None
    ds = _records(files, True, cfg.seed, repeat, stats, expected)
    ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed)

    def prep(serialized):  # parse + preprocess in one map: one function call per clip
        enc, label, _ = parse_clip(serialized)
        if stats is None:  # tf.data service workers cannot update these counters
            return preprocess_train(enc, cfg), label
        with tf.control_dependencies([stats.attempted.assign_add(1)]):
            frames = preprocess_train(enc, cfg)
        with tf.control_dependencies([frames]):
            done = stats.decoded.assign_add(1)
        with tf.control_dependencies([done]):
            return tf.identity(frames), label

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    classes = int(manifest["num_classes"])
    if cfg.mixes:
        ds = ds.map(augment.ClipMixer(classes, cfg.mixup_alpha, cfg.cutmix_alpha),
                    num_parallel_calls=tf.data.AUTOTUNE)
    elif one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, classes)))
    if data_service:
        from stfusion_tf.data import service
        ds = service.distribute(ds, data_service)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(data_dir: str, split: str, cfg: InputConfig) -> tf.data.Dataset:
    """Flattened views: (clips [B,T,H,W,3], labels [B], video index [B]).

    Each video yields ``num_clips * num_crops`` consecutive views that share a
    video index; average their scores for video-level accuracy.  Views are made
    one clip at a time (``preprocess_eval_clip``), so memory does not grow with
    the number of views per video.
    """
    manifest = records.read_manifest(data_dir)
    ds = _records(records.shard_paths(data_dir, split, manifest), False, None,
                  expected=records.shard_clip_counts(data_dir, split, manifest))
    ds = ds.map(parse_clip, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.enumerate()

    def clips(i, item):  # the encoded frames of each clip: strings, no pixels yet
        enc, label, _ = item
        sampled = tf.reshape(sample_frames(enc, cfg, training=False),
                             [cfg.num_clips, cfg.num_frames])
        return tf.data.Dataset.from_tensor_slices((
            sampled, tf.fill([cfg.num_clips], label),
            tf.fill([cfg.num_clips], tf.cast(i, tf.int32))))

    def views(enc, label, vid):
        return (preprocess_eval_clip(enc, cfg), tf.fill([cfg.num_crops], label),
                tf.fill([cfg.num_crops], vid))

    # A clip that fails to decode is dropped (its crops stay together); the evaluation
    # reports how many videos it scored.
    ds = ds.flat_map(clips)
    ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return ds.unbatch().batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
