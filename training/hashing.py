"""Keyed 64-bit hashing of categorical values, computed on Arrow buffers (offsets + data) with numpy.

The hash of one value (its UTF-8 bytes, length ``n``) under a 64-bit ``seed``::

    w_j   = little-endian uint64 of bytes [8j, 8j + 8), zero-padded; j < max(1, ceil(n / 8))
    hash  = fmix64(w_0 ^ seed ^ n * G  ^  XOR_{j >= 1} fmix64(w_j ^ (seed + j * G)))     (mod 2**64)

with ``fmix64`` MurmurHash3's finaliser and ``G = 0x9E3779B97F4A7C15``. :func:`feature_seed` derives the
seed from the feature name keyed by ``PreprocessConfig.hash_key`` (BLAKE2b), so every feature hashes
differently. :func:`bucket` maps a hash to an id in ``[1, size)`` with a multiply-shift on its top 32
bits. ``spec.HASH_SCHEME`` names this function in saved configs. :func:`row_keys` gives every row of an input
file a key from the file's content hash and the row's line number (the random split, the reference sample).
No per-value Python object is created: values up to 8 bytes take one word, longer ones a segmented XOR. The
arithmetic runs in place (fresh temporaries of a few hundred KB cost more in page faults than in work).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from recops.training.columns import buffers
from recops.training.spec import MAX_TABLE_SIZE

_G = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB3F99AB8E2AD)
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def feature_seed(feature: str, key: str) -> np.uint64:
    """The 64-bit seed of one feature under a 16-byte ``key``."""
    digest = hashlib.blake2b(feature.encode(), digest_size=8, key=key.encode(), person=b"recops-feature")
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def fmix64(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array (``scratch``: a same-size buffer it overwrites)."""
    for multiplier in (_M1, _M2, None):
        np.right_shift(x, np.uint64(33), out=scratch)
        np.bitwise_xor(x, scratch, out=x)
        if multiplier is not None:
            np.multiply(x, multiplier, out=x)
    return x


def source_key(sha256: str, purpose: str, seed: int = 0) -> np.uint64:
    """The 64-bit key of one input file (its content hash) for one use of its row keys (a split, a sample)."""
    digest = hashlib.blake2b(f"{sha256}:{seed}".encode(), digest_size=8, person=purpose.encode()[:16])
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def row_keys(source: np.uint64, lines: np.ndarray) -> np.ndarray:
    """uint64 key of each row, ``fmix64(line * G ^ source)``: a function of the file and the line number only,
    so it does not depend on how the file is cut into blocks or pieces nor on which process reads them."""
    keys = np.asarray(lines, np.int64).view(np.uint64) * _G
    keys ^= source
    return fmix64(keys, np.empty_like(keys))


def hash_values(array: pa.Array | pa.ChunkedArray, seed: np.uint64 | np.ndarray) -> np.ndarray:
    """uint64 hash of every value of a string or binary array (those of null and empty values are not ids:
    callers give them id 0). ``seed`` is one seed, or one per value (several features hashed in one pass)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    return _hash_chunk(array, seed)


def bucket(hashes: np.ndarray, size: int | np.ndarray) -> np.ndarray:
    """int64 ids in ``[1, size)``: ``1 + ((hash >> 32) * (size - 1) >> 32)``; overwrites ``hashes``. ``size`` is
    one table size or one per hash."""
    sizes = np.asarray(size, dtype=np.int64)
    if sizes.size and not (sizes.min() >= 2 and sizes.max() <= MAX_TABLE_SIZE):
        raise ValueError(f"bucket count {size} outside [2, 2**32]")
    np.right_shift(hashes, np.uint64(32), out=hashes)
    np.multiply(hashes, (sizes - 1).astype(np.uint64), out=hashes)
    np.right_shift(hashes, np.uint64(32), out=hashes)
    ids = hashes.view(np.int64)
    ids += 1
    return ids


def _hash_chunk(array: pa.Array, seed: np.uint64) -> np.ndarray:
    offsets, data = buffers(array)
    lengths = np.diff(offsets)
    h = _first_words(offsets, data, lengths)
    scratch = np.empty_like(h)
    np.multiply(lengths.view(np.uint64), _G, out=scratch)
    h ^= scratch
    h ^= seed
    if len(lengths) and lengths.max() > 8:
        h ^= _later_words(offsets, data, lengths, seed)
    return fmix64(h, scratch)


def _first_words(offsets: np.ndarray, data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """w_0 of every value, a new array; packed values of one width <= 8 bytes are copied without a gather."""
    present = lengths > 0
    count = int(np.count_nonzero(present))
    width = int(lengths.max()) if len(lengths) else 0
    span = data[offsets[0] : offsets[-1]]
    if not 0 < width <= 8 or len(span) != width * count:
        return _gather_words(span, offsets[:-1] - offsets[0], lengths)
    words = np.zeros(len(lengths), np.uint64)
    if count == len(lengths):
        words.view(np.uint8).reshape(-1, 8)[:, :width] = span.reshape(count, width)
    elif width == 8:
        words[present] = span.view("<u8")
    else:
        packed = np.zeros((count, 8), np.uint8)
        packed[:, :width] = span.reshape(count, width)
        words[present] = packed.view("<u8").ravel()
    return words


def _gather_words(span: np.ndarray, starts: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """The 8 bytes at each start (fewer where ``remaining`` < 8, the rest zero) as little-endian uint64."""
    padded = np.zeros(len(span) + 8, np.uint8)
    padded[: len(span)] = span
    unaligned = np.ndarray((len(span) + 1,), "<u8", padded.data, 0, (1,))
    words = unaligned[starts]
    words &= _LOW_BYTES[np.clip(remaining, 0, 8)]
    return words


def _later_words(offsets: np.ndarray, data: np.ndarray, lengths: np.ndarray, seed: np.uint64) -> np.ndarray:
    """XOR over j >= 1 of fmix64(w_j ^ (seed + j * G)) per value (0 for values of up to 8 bytes)."""
    extra = np.maximum((lengths + 7) // 8 - 1, 0)
    rows = np.repeat(np.arange(len(lengths)), extra)
    j = np.arange(1, len(rows) + 1) - np.repeat(np.cumsum(extra) - extra, extra)
    starts = offsets[:-1][rows] - offsets[0] + 8 * j
    words = _gather_words(data[offsets[0] : offsets[-1]], starts, offsets[1:][rows] - offsets[0] - starts)
    keys = j.view(np.uint64) * _G
    keys += seed if np.ndim(seed) == 0 else seed[rows]
    words ^= keys
    mixed = fmix64(words, keys)
    out = np.zeros(len(lengths), np.uint64)
    out[extra > 0] = np.bitwise_xor.reduceat(mixed, (np.cumsum(extra) - extra)[extra > 0])
    return out
