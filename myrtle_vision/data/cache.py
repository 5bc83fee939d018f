"""A split's images decoded once, into one memory-mapped uint8 file.

Decoding a JPEG costs more than everything else the loader does to it, and the earlier pipeline
decoded every image again in every epoch. :class:`DecodedImages` decodes each image of a split
once (RGB, as :func:`~myrtle_vision.data.images.load_image` converts it) and keeps the pixels,
one image after another, height x width x 3, in ``<cache_dir>/<name>.u8``, with an index
(``<name>.json``: offset and size of each image) written beside it. Reading an image is then a
slice of a memory map: no decoding, and a cache larger than the machine's memory still works (the
operating system pages it in).

The index records a fingerprint of the split file's text and of every listed image's size and
modification time. A cache is reused while the fingerprint matches, and rebuilt (with a line saying
why) when the split file or any image changed. Building writes to temporary files and renames them
when complete, under a file lock, so that processes started together (torchrun) build it once and a
killed build leaves nothing half-written behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError, reason

VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/myrtle_vision`` (``~/.cache/myrtle_vision`` by default), as tools that cache do."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "myrtle_vision"


def fingerprint(list_path: Path, paths: list[str]) -> str:
    """What the cache depends on: the split file's text and each image's path, size and modification time."""
    h = hashlib.sha256(list_path.read_bytes())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class DecodedImages:
    """The decoded images of one split, read from (and built into) a memory-mapped cache file."""

    def __init__(self, list_path: Path, paths: list[str], load: Callable[[int], "np.ndarray"], cache_dir: Path,
                 where: str, announce: bool = True):
        self.paths = paths
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{list_path.parent.name}-{list_path.stem}")[:80]
        key = hashlib.sha256(str(list_path.resolve()).encode()).hexdigest()[:12]
        self.pixels_path = cache_dir / f"{stem}-{key}.u8"
        self.index_path = cache_dir / f"{stem}-{key}.json"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with open(cache_dir / f".{stem}-{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait, then reuse its cache
                index = self._valid_index(list_path)
                if index is None:
                    index = self._build(list_path, load, announce)
        except OSError as e:
            raise UserError(f"{cache_dir}: cannot write the decoded-image cache ({reason(e)}); set {where} to a "
                            "writable folder, or decode_cache to false") from None
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.shapes = np.asarray(index["shapes"], dtype=np.int64).reshape(-1, 2)
        self._map, self._pid = None, None

    def _valid_index(self, list_path: Path) -> dict | None:
        """The index of a complete cache of exactly these images, or None."""
        try:
            index = json.loads(self.index_path.read_text())
            ok = (index.get("version") == VERSION and index.get("paths") == self.paths
                  and index.get("fingerprint") == fingerprint(list_path, self.paths)
                  and self.pixels_path.stat().st_size == index["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return index if ok else None

    def _build(self, list_path: Path, load: Callable[[int], np.ndarray], announce: bool) -> dict:
        existed = self.index_path.exists()
        if announce:
            print(f"{list_path}: {'changed since its images were decoded; decoding again' if existed else 'decoding'} "
                  f"its {len(self.paths)} images once, into {self.pixels_path}", flush=True)
        started = time.perf_counter()
        tmp = self.pixels_path.with_name(f".{self.pixels_path.name}.tmp{os.getpid()}")
        offsets, shapes, offset = [], [], 0
        try:
            with open(tmp, "wb") as out, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                # Pillow decodes with the GIL released: threads decode in parallel, in order.
                decoded = pool.map(load, range(len(self.paths)))
                # a bar on a terminal; in logs, the lines before and after
                for arr in tqdm(decoded, total=len(self.paths), desc="decoding", unit="img", mininterval=1.0,
                                disable=not (announce and sys.stderr.isatty())):
                    out.write(arr.tobytes())
                    offsets.append(offset)
                    shapes.append(arr.shape[:2])
                    offset += arr.size
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.pixels_path)
        finally:
            tmp.unlink(missing_ok=True)
        index = {"version": VERSION, "list": str(list_path), "paths": self.paths, "bytes": offset,
                 "fingerprint": fingerprint(list_path, self.paths), "offsets": offsets,
                 "shapes": [int(x) for s in shapes for x in s]}
        tmp_index = self.index_path.with_name(f".{self.index_path.name}.tmp{os.getpid()}")
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, self.index_path)
        if announce:
            print(f"{list_path}: decoded {len(self.paths)} images ({offset / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        return index

    def _pixels(self) -> np.memmap:
        if self._map is None or self._pid != os.getpid():  # each loader worker maps it for itself
            self._map, self._pid = np.memmap(self.pixels_path, dtype=np.uint8, mode="r"), os.getpid()
        return self._map

    def __len__(self) -> int:
        return len(self.offsets)

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index``, without reading it."""
        h, w = self.shapes[index]
        return int(h), int(w)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 (3, height, width) tensor (a copy, so the map stays read-only)."""
        h, w = self.shapes[index]
        start = self.offsets[index]
        hwc = np.array(self._pixels()[start:start + h * w * 3]).reshape(h, w, 3)
        return torch.from_numpy(hwc).permute(2, 0, 1)

    def __getstate__(self):  # a worker maps the file again rather than pickling the map
        state = dict(self.__dict__)
        state["_map"] = state["_pid"] = None
        return state
