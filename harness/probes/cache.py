"""On-disk feature cache for the ``fast`` protocol: fp16 features, written once, memory-mapped for training.

Layout of one cache (a directory named by what determines its content)::

    <cache_dir>/<backbone>__<method>__<dataset>__<split>__<view>__<hash>/
        meta.json      key fields, field dtypes, item count, bytes per field file, complete flag
        index.npz      per field: (count, 1 + ndim) int64 rows = byte offset, shape
        <field>.bin    the items' arrays, appended back to back (features in float16)

The hash covers backbone, method and its parameters, weights hash, dataset, split, view (resolution and
pipeline) and image limit, so a cache can never be reused for a different model or view. Extraction
survives interruption: the index is flushed every ``FLUSH_EVERY`` items, and reopening truncates the
field files to the last flushed state and continues from there.

Corruption is detected, never used: ``meta.json`` holds the SHA-256 of every field file's flushed bytes and of
the index; opening a cache re-hashes them (about 1 s per GB) and a cache whose files are unreadable or do not
match is deleted and rebuilt (one line on stderr says so). Writes go through :mod:`harness.io_safety` (a full
disk is a :class:`~harness.errors.StorageError` naming the file), and :func:`harness.probes.extract.fill_cache`
holds a file lock, so two runs filling the same cache take turns instead of interleaving their bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import HarnessError
from ..io_safety import atomic_write, atomic_write_text, ensure_dir, sha256_file, storage_error

#: 2: meta.json holds SHA-256 checksums (format-1 caches are rebuilt once)
CACHE_FORMAT_VERSION = 2
FLUSH_EVERY = 256


class CacheError(HarnessError):
    """A cache directory is unusable (corrupt or written for another configuration)."""


def cache_key(fields: Dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir_name(fields: Dict[str, Any]) -> str:
    """Readable prefix + hash: ``<backbone>__<method>__<dataset>__<split>__<view>__<hash>``."""
    parts = [str(fields.get(k, "")) for k in ("backbone", "method", "dataset", "split", "view")]
    return "__".join(p.replace("/", "-") for p in parts) + "__" + cache_key(fields)


def _cutter(windows: Optional[Sequence[Tuple[slice, slice]]], n: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """``cut(k, item)``: item k's window of its last two axes (a view), or the item itself without windows."""
    if windows is None:
        return lambda k, a: a
    if len(windows) != n:
        raise ValueError(f"{len(windows)} windows for {n} items")
    return lambda k, a: a[..., windows[k][0], windows[k][1]]


class FeatureCache:
    """Append-only store of per-item arrays (see module doc).

    Args:
        path: the cache directory.
        key_fields: what the content depends on; must match an existing cache's.
        fields: field name -> numpy dtype name, e.g. {"patch": "float16", "label": "uint8"}.
    """

    def __init__(self, path: str, key_fields: Dict[str, Any], fields: Dict[str, str]) -> None:
        self.path = path
        self.key_fields = json.loads(json.dumps(key_fields, sort_keys=True, default=str))
        self.fields = dict(fields)
        self.count = 0
        self.complete = False
        self._index: Dict[str, List[List[int]]] = {f: [] for f in self.fields}
        self._sizes: Dict[str, int] = {f: 0 for f in self.fields}
        self._hash: Dict[str, Any] = {}
        self._handles: Dict[str, Any] = {}
        self._maps: Dict[str, np.memmap] = {}
        self._since_flush = 0
        self._load()

    # -- state ---------------------------------------------------------------------------------
    def _meta_path(self) -> str:
        return os.path.join(self.path, "meta.json")

    def _bin(self, field: str) -> str:
        return os.path.join(self.path, f"{field}.bin")

    def _index_path(self) -> str:
        return os.path.join(self.path, "index.npz")

    def _reset(self) -> None:
        self.count = 0
        self.complete = False
        self._index = {f: [] for f in self.fields}
        self._sizes = {f: 0 for f in self.fields}
        self._hash = {f: hashlib.sha256() for f in self.fields}

    def reload(self) -> None:
        """Read the on-disk state again (another process may have extended or finished the cache)."""
        self._maps.clear()
        self._reset()
        self._load()

    def _load(self) -> None:
        self._reset()
        if not os.path.isfile(self._meta_path()):
            return
        try:
            with open(self._meta_path()) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not {"key_fields", "fields", "count", "sizes", "complete",
                                                  "sha256"} <= set(meta):
                raise ValueError("meta.json lacks count, sizes, complete or sha256")
        except (OSError, ValueError) as e:
            return self._discard(f"meta.json is unreadable ({str(e).splitlines()[0] if str(e) else e!r})")
        if meta.get("key_fields") != self.key_fields or meta.get("fields") != self.fields:
            raise CacheError(f"feature cache {self.path} was written for another configuration; delete it "
                             f"(or pass another --cache-dir)")
        why = self._verify(meta)
        if why:
            return self._discard(why)
        idx = np.load(self._index_path())
        self.count = int(meta["count"])
        self.complete = bool(meta["complete"])
        self._sizes = {f: int(s) for f, s in meta["sizes"].items()}
        self._index = {f: idx[f][: self.count].tolist() for f in self.fields}

    def _verify(self, meta: Dict[str, Any]) -> Optional[str]:
        """Why the files do not match the checksums in ``meta`` (None when they do); keeps the field hashers,
        so appending continues each file's running checksum."""
        sums = meta["sha256"]
        try:
            if sha256_file(self._index_path()) != sums.get("index"):
                return "index.npz fails its checksum"
            for f in self.fields:
                size = int(meta["sizes"][f])
                if not os.path.isfile(self._bin(f)) or os.path.getsize(self._bin(f)) < size:
                    return f"{f}.bin is missing or shorter than its {size} recorded bytes"
                h = hashlib.sha256()
                with open(self._bin(f), "rb") as fh:
                    left = size
                    while left > 0:
                        b = fh.read(min(1 << 22, left))
                        if not b:
                            break
                        h.update(b)
                        left -= len(b)
                if h.hexdigest() != sums.get(f):
                    return f"{f}.bin fails its checksum"
                self._hash[f] = h
        except (OSError, KeyError, TypeError, ValueError) as e:
            return f"unreadable ({e})"
        return None

    def _discard(self, why: str) -> None:
        """A corrupt cache is never used: say so, delete its files, start empty."""
        print(f"harness: feature cache {self.path}: {why}; rebuilding it", file=sys.stderr)
        for name in os.listdir(self.path):
            p = os.path.join(self.path, name)
            if os.path.isfile(p) and not name.endswith(".lock"):
                os.remove(p)
        self._reset()

    def _flush(self) -> None:
        try:
            for h in self._handles.values():
                h.flush()
                os.fsync(h.fileno())
        except OSError as e:
            raise storage_error(e, self.path, "feature cache") from e
        # (count, 1 + ndim) rows; (0, 1) when nothing was appended yet (an interruption in the first batch)
        arrays = {f: np.asarray(rows, dtype=np.int64).reshape(len(rows), -1) if rows else np.zeros((0, 1), np.int64)
                  for f, rows in self._index.items()}
        atomic_write(self._index_path(), lambda fh: np.savez(fh, **arrays), "feature cache index")
        sums = {f: h.hexdigest() for f, h in self._hash.items()}
        sums["index"] = sha256_file(self._index_path())
        meta = {"format": CACHE_FORMAT_VERSION, "key_fields": self.key_fields, "fields": self.fields,
                "count": self.count, "sizes": self._sizes, "complete": self.complete, "sha256": sums}
        atomic_write_text(self._meta_path(), json.dumps(meta, indent=1), "feature cache metadata")
        self._since_flush = 0

    # -- writing -------------------------------------------------------------------------------
    def open_for_write(self) -> int:
        """Prepare to append; returns how many items are already stored (resume point)."""
        ensure_dir(self.path, "feature cache", "--cache-dir")
        try:
            for f in self.fields:
                p = self._bin(f)
                mode = "r+b" if os.path.exists(p) else "w+b"
                h = open(p, mode)
                h.truncate(self._sizes[f])  # drop bytes written after the last flush
                h.seek(self._sizes[f])
                self._handles[f] = h
        except OSError as e:
            raise storage_error(e, self.path, "feature cache") from e
        self._maps.clear()
        return self.count

    def append(self, item: Dict[str, np.ndarray]) -> None:
        if set(item) != set(self.fields):
            raise ValueError(f"cache item fields {sorted(item)} != {sorted(self.fields)}")
        for f, arr in item.items():
            a = np.ascontiguousarray(arr, dtype=self.fields[f])
            data = a.tobytes()
            try:
                self._handles[f].write(data)
            except OSError as e:
                raise storage_error(e, self._bin(f), "feature cache") from e
            self._index[f].append([self._sizes[f], *a.shape])
            self._hash[f].update(data)
            self._sizes[f] += a.nbytes
        self.count += 1
        self._since_flush += 1
        if self._since_flush >= FLUSH_EVERY:
            self._flush()

    def finish(self) -> None:
        """Mark the cache complete and close the files."""
        self.complete = True
        self._flush()
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._maps.clear()

    def close(self) -> None:
        """Flush what was written (an interrupted extraction resumes from here)."""
        if self._handles:
            self._flush()
            for h in self._handles.values():
                h.close()
            self._handles.clear()

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count

    def _map(self, field: str) -> np.memmap:
        if field not in self._maps:
            self._maps[field] = np.memmap(self._bin(field), dtype=self.fields[field], mode="r")
        return self._maps[field]

    def get(self, i: int, field: str) -> np.ndarray:
        row = self._index[field][i]
        off, shape = row[0], tuple(row[1:])
        n = int(np.prod(shape)) if shape else 1
        item = np.dtype(self.fields[field]).itemsize
        return self._map(field)[off // item: off // item + n].reshape(shape)

    def shape(self, i: int, field: str) -> tuple:
        return tuple(self._index[field][i][1:])

    def stack(self, indices: Sequence[int], field: str, dtype: Optional[torch.dtype] = None,
              windows: Optional[Sequence[Tuple[slice, slice]]] = None) -> torch.Tensor:
        """Items ``indices`` of one field (all the same shape) as one tensor; with ``windows``, item k is cut
        to ``[..., rows_k, cols_k]`` of its last two axes first (all windows the same size)."""
        cut = _cutter(windows, len(indices))
        arr = np.stack([cut(k, self.get(int(i), field)) for k, i in enumerate(indices)])
        t = torch.from_numpy(arr)
        return t.to(dtype) if dtype is not None else t

    def stack_channels_first(self, indices: Sequence[int], field: str,
                             windows: Optional[Sequence[Tuple[slice, slice]]] = None) -> torch.Tensor:
        """Items ``indices`` of a (C, ...) field as one float32 (C, len(indices), ...) tensor; ``windows`` as in
        :meth:`stack` (only the window is read from the memory map).

        One pass per item (read + convert + place), no intermediate (B, C, ...) copy: the layout the ``fast``
        v2 steps multiply with (:func:`harness.probes.heads.centre_batch`). The pass is torch's converting
        copy, which runs on every intra-op thread (a 16-view ViT-S/14 NYU batch: 4 ms, numpy's single-threaded
        assignment 20 ms, a twentieth of a ``fast`` v3 depth step).
        """
        cut = _cutter(windows, len(indices))
        first = cut(0, self.get(int(indices[0]), field)).shape
        out = torch.empty((first[0], len(indices), *first[1:]), dtype=torch.float32)
        with warnings.catch_warnings():  # the memory map is read-only and only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for k, i in enumerate(indices):
                out[:, k].copy_(torch.from_numpy(cut(k, self.get(int(i), field))))
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(self._sizes.values()))

    def field_nbytes(self, fields: Iterable[str]) -> int:
        return int(sum(self._sizes[f] for f in fields))
