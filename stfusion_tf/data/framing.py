"""TFRecord framing: find every readable record of a damaged shard.

A TFRecord file is a sequence of records framed as

    uint64 length | uint32 masked CRC32C(length) | data | uint32 masked CRC32C(data)

TensorFlow's readers stop at the first record whose CRC does not match: one
flipped byte costs the rest of the shard.  ``scan_records`` walks the framing
instead.  A record whose data is damaged but whose length is intact is skipped
by its length; where the length itself is damaged, the next offset whose 12
bytes form a valid header (length CRC matches, the record fits in the file) is
searched for, vectorised over the bytes with NumPy, and TensorFlow's own
reader checks the data CRC of every record returned.  Only the damaged records
are lost.  Healthy shards never come here: the input pipeline reads them with
``TFRecordDataset`` and hands a shard to this reader only after that read ended
short (``pipeline._records``).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterator

import numpy as np

HEADER = 12  # uint64 length + uint32 masked CRC of it
FOOTER = 4  # uint32 masked CRC of the data
_MASK_DELTA = np.uint32(0xA282EAD8)


def _crc32c_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table[i] = c
    return table


_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (pure Python: meant for headers)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = int(_TABLE[(crc ^ b) & 0xFF]) ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _valid_headers(buf: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets p in ``buf`` where buf[p:p+12] is a valid header of a length below
    ``size``, and those lengths."""
    n = len(buf) - HEADER + 1
    # A length below ``size`` has zeros in its high bytes: a cheap filter before the CRC.
    zero = np.ones(n, bool)
    for j in range((size.bit_length() + 7) // 8, 8):
        zero &= buf[j:j + n] == 0
    cand = np.flatnonzero(zero)
    crc = np.full(len(cand), 0xFFFFFFFF, np.uint32)
    for j in range(8):
        crc = _TABLE[(crc ^ buf[cand + j]) & 0xFF] ^ (crc >> np.uint32(8))
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + _MASK_DELTA
    stored = np.zeros(len(cand), np.uint32)
    length = np.zeros(len(cand), np.uint64)
    for j in range(4):
        stored |= buf[cand + 8 + j].astype(np.uint32) << np.uint32(8 * j)
    for j in range(8):
        length |= buf[cand + j].astype(np.uint64) << np.uint64(8 * j)
    ok = masked == stored
    return cand[ok], length[ok]


def find_header(f, start: int, size: int, chunk: int = 1 << 22) -> int | None:
    """The first offset >= ``start`` of ``f`` (a seekable binary file of ``size`` bytes)
    where a valid header begins whose record fits in the file, or None."""
    pos = start
    while pos + HEADER + FOOTER <= size:
        f.seek(pos)
        buf = np.frombuffer(f.read(min(chunk, size - pos)), np.uint8)
        if len(buf) < HEADER:
            return None
        cand, length = _valid_headers(buf, size)
        offsets = pos + cand.astype(np.uint64)
        # Compare in uint64 before adding: a garbage length must not wrap around.
        fits = (offsets + np.uint64(HEADER + FOOTER) <= np.uint64(size)) & (
            length <= np.uint64(size) - offsets - np.uint64(HEADER + FOOTER))
        hits = cand[fits]
        if hits.size:
            return pos + int(hits[0])
        pos += len(buf) - HEADER + 1  # the next chunk overlaps by HEADER - 1 bytes
    return None


def _read_header(f, offset: int) -> int | None:
    """The length in the header at ``offset``, or None when the header is damaged."""
    f.seek(offset)
    head = f.read(HEADER)
    if len(head) < HEADER:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    (crc,) = struct.unpack("<I", head[8:])
    return length if masked_crc32c(head[:8]) == crc else None


def _next_record(f, offset: int, size: int) -> int | None:
    """Where reading resumes after a damaged record at ``offset``: past it by its own
    length when that is intact and a header follows, else the next valid header."""
    length = _read_header(f, offset)
    if length is not None:
        nxt = offset + HEADER + length + FOOTER
        if nxt == size or (nxt < size and _read_header(f, nxt) is not None):
            return nxt
    return find_header(f, offset + 1, size)


def _open(path: str):
    """(binary file, size, record reader) for a local path or a TF filesystem URL."""
    import tensorflow as tf
    from tensorflow.python.lib.io import _pywrap_record_io
    size = tf.io.gfile.stat(path).length
    return tf.io.gfile.GFile(path, "rb"), size, _pywrap_record_io.RandomRecordReader(path)


def scan_records(path: str, skip: int = 0) -> Iterator[tuple]:
    """Walks the shard at ``path``: yields ``("record", offset, data)`` for every record
    that reads with a matching CRC and ``("damaged", start, end)`` for every stretch of
    bytes that does not, in file order.

    ``skip`` records are passed over first by their headers (a reader that already
    delivered them starts here).  Raises ``tf.errors.OpError`` / ``OSError`` only when the
    file cannot be opened.
    """
    import tensorflow as tf
    f, size, reader = _open(path)
    with f:
        offset = 0
        for _ in range(skip):
            length = _read_header(f, offset)
            if length is None:
                break
            offset += HEADER + length + FOOTER
        while offset < size:
            try:
                data, nxt = reader.read(offset)
            except (tf.errors.OpError, IndexError, OSError):
                nxt = _next_record(f, offset, size)
                yield ("damaged", offset, size if nxt is None else nxt)
                if nxt is None:
                    return
                offset = nxt
                continue
            yield ("record", offset, bytes(data))
            offset = nxt


def readable_records(path: str, skip: int = 0) -> Iterator[bytes]:
    """Every record of ``path`` (after the first ``skip``) that reads: the damaged ones
    are left out."""
    for kind, _, data in scan_records(path, skip):
        if kind == "record":
            yield data


def file_digest(path: str) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file (local path or TF filesystem URL)."""
    import tensorflow as tf
    h, n = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}
