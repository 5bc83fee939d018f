"""A split's images decoded once, into one memory-mapped uint8 file.

Decoding a JPEG costs more than everything else the loader does to it, and the earlier pipeline
decoded every image again in every epoch. :class:`DecodedImages` decodes each image of a split
once (RGB, as :func:`~myrtle_vision.data.images.read_rgb` converts it) and keeps the pixels,
one image after another, height x width x 3, in ``<cache_dir>/<name>.u8``, with an index
(``<name>.json``: offset and size of each image) written beside it. Reading an image is then a
slice of a memory map: no decoding, and a cache larger than the machine's memory still works (the
operating system pages it in).

What the cache promises. A cache is reused only when all of these hold, and otherwise decoded again
(with a line saying why):

- the split file's bytes are those the images were listed from (SHA-256), and it lists the same paths;
- every listed image file has the same size, modification time, status-change time (``st_ctime_ns``)
  and inode number as when it was decoded: its :func:`stamp`, taken just before the build decodes
  anything (so a change made during the build is seen too);
- for an image whose modification or status-change time was within :data:`RACY_NS` (2 s) of the
  build's start, or after it, the SHA-256 of its bytes now equals that of the exact bytes that were
  decoded. Such an image could be rewritten, with the same size, within the same tick of the file
  system's clock, leaving its stamp as it was (git calls this "racily clean" and does the same). Once
  a check that began more than 2 s after its last change has found it unchanged, its hash is dropped
  from the index (any later change moves its status-change time);
- the index was written by this version of the package, with the same Pillow version.

No tool can set the status-change time: any write, truncation, rename over the file, copy over it
(``cp -p``, ``rsync -a``, ``shutil.copy2``), ``touch``/``os.utime`` (``touch -r`` included) or
``chmod`` sets it to the current time. So an edit that keeps the size, a copy that keeps the
modification time, or a file renamed over an image is seen, each by the status-change time (and
the rename, rsync's way of replacing a file, also by the inode). Any of these decodes the split
again even where the pixels did not change (a ``touch``, a ``chmod``, a copy of the same bytes);
reading an image, which may change its access time, never does.

What it does not promise: changes made while the system clock was set back, or on a file system
whose clock is more than 2 s apart from this machine's (a network file server with a skewed clock)
or whose timestamps are coarser than 2 s; an image put back with its old inode, size and both
times by something below the file system (a block-level snapshot rolled back); a change to how
images are decoded that is neither this package's nor Pillow's version (a system libjpeg replaced
under the same Pillow): delete the cache folder then.

Building writes to temporary files and renames them when complete, under a file lock (``flock``), so
that processes started together on one machine (torchrun) build it once (the others wait for the lock, then find the
cache valid and read it) and a killed build leaves nothing half-written behind. A process keeps the
pixels file it checked open, and its loader workers open that same file (through ``/proc``), so
that another process decoding the split again meanwhile (renaming a new file over it) changes
nothing for it; where the file cannot be reached that way, reading it is a one-line error, never
another build's pixels at this index's offsets.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
from tqdm import tqdm

from ..errors import UserError, reason
from ..reporting import say

VERSION = 2  # 2: the stamps and hashes below; 16-bit images scaled, not clipped (see images.read_rgb)
RACY_NS = 2_000_000_000  # an image changed this close to a build's start is also checked by its bytes' hash


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/myrtle_vision`` (``~/.cache/myrtle_vision`` by default), as tools that cache do."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "myrtle_vision"


def stamp(st: os.stat_result) -> list[int]:
    """What the cache compares of an image file without reading it: its size, modification time,
    status-change time (ns) and inode number (not its access time: reading it must not count as a change)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _racy(s: list[int], since_ns: int) -> bool:
    """Whether a file of stamp ``s`` changed at most :data:`RACY_NS` before ``since_ns`` (or later): it may
    change again within the same tick of the file system's clock without its stamp changing."""
    return max(s[1], s[2]) >= since_ns - RACY_NS


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DecodedImages:
    """The decoded images of one split, read from (and built into) a memory-mapped cache file.

    ``decode(index, data)`` decodes image ``index`` from ``data``, its file's bytes (read once, here,
    so that the hash of a racy image is the hash of exactly what was decoded): uint8 (height, width, 3).
    ``list_bytes`` are the bytes of the split file that ``paths`` were read from."""

    def __init__(
        self,
        list_path: Path,
        paths: list[str],
        decode: Callable[[int, bytes], np.ndarray],
        cache_dir: Path,
        where: str,
        announce: bool = True,
        list_bytes: bytes | None = None,
    ):
        self.paths = paths
        list_bytes = list_bytes if list_bytes is not None else list_path.read_bytes()
        self._list_sha256 = _sha256(list_bytes)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{list_path.parent.name}-{list_path.stem}")[:80]
        key = hashlib.sha256(str(list_path.resolve()).encode()).hexdigest()[:12]
        self.pixels_path = cache_dir / f"{stem}-{key}.u8"
        self.index_path = cache_dir / f"{stem}-{key}.json"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with open(cache_dir / f".{stem}-{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait, then reuse its cache
                index, why = self._valid_index()
                if index is None:
                    index = self._build(list_path, decode, announce, why)
                # Held open: the pixels this index describes, even if another process decodes the split again
                # (and renames a new file over this one) while this one and its loader workers read it.
                self._file = open(self.pixels_path, "rb")
        except OSError as e:
            raise UserError(
                f"{cache_dir}: cannot write the decoded-image cache ({reason(e)}); set {where} to a "
                "writable folder, or decode_cache to false"
            ) from None
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.shapes = np.asarray(index["shapes"], dtype=np.int64).reshape(-1, 2)
        st = os.fstat(self._file.fileno())
        self._owner, self._fd, self._file_id = os.getpid(), self._file.fileno(), (st.st_dev, st.st_ino)
        self._map, self._pid = None, None

    def _valid_index(self) -> tuple[dict | None, str | None]:
        """(the index of a complete cache of exactly these images, None), or (None, why it cannot be used;
        None when there is no cache yet)."""
        try:
            index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, "its index cannot be read"
        began = time.time_ns()  # before any file is looked at
        try:
            why = self._stale(index)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            why = "its index is not this version's"
        if why is None:
            self._forget_settled(index, began)
        return (None, why) if why else (index, None)

    def _stale(self, index: dict) -> str | None:
        """Why the cache of ``index`` does not hold these images as their files are now, or None."""
        if index.get("version") != VERSION or index.get("pillow") != PIL.__version__:
            return "made by another version of myrtle_vision or Pillow"
        if index["list_sha256"] != self._list_sha256 or index["paths"] != self.paths:
            return "the split file changed"
        try:
            if self.pixels_path.stat().st_size != index["bytes"]:
                return "its pixels file is incomplete"
        except OSError:
            return "its pixels file is missing"
        stamps, hashes = index["stamps"], index["hashes"]
        if len(stamps) != len(self.paths):
            return "its index is incomplete"
        for path, recorded in zip(self.paths, stamps):
            try:
                now = stamp(os.stat(path))
            except OSError:
                return f"{path} cannot be read"
            if now != recorded:
                return f"{path} changed"
        for i, digest in hashes.items():
            try:
                if _sha256(Path(self.paths[int(i)]).read_bytes()) != digest:
                    return f"{self.paths[int(i)]} changed"
            except OSError:
                return f"{self.paths[int(i)]} cannot be read"
        return None

    def _forget_settled(self, index: dict, began: int) -> None:
        """Drop the hashes of racy images that were found unchanged (by stamp and hash) by a check that
        began more than RACY_NS after their last change: a change within the tick of that change came before
        the check, which saw its bytes; any later one gets a later status-change time, which the stamp shows."""
        hashes = index["hashes"]
        if not hashes:
            return
        settled = {i for i in hashes if not _racy(index["stamps"][int(i)], began)}
        if settled:
            index["hashes"] = {i: h for i, h in hashes.items() if i not in settled}
            try:
                self._write_index(index)
            except OSError:
                pass  # a read-only cache still works: the hashes are checked again next time

    def _write_index(self, index: dict) -> None:
        tmp_index = self.index_path.with_name(f".{self.index_path.name}.tmp{os.getpid()}")
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, self.index_path)

    def _build(
        self, list_path: Path, decode: Callable[[int, bytes], np.ndarray], announce: bool, why: str | None
    ) -> dict:
        if announce:
            again = f"its decoded images cannot be reused ({why}); decoding again" if why else "decoding"
            say(f"{list_path}: {again} its {len(self.paths)} images once, into {self.pixels_path}")
        started = time.perf_counter()
        # Every image's stamp first, before anything is decoded: whatever changes from here on changes a
        # stamp (and is decoded again next time), except within a tick of the clock: those, hashed below.
        since = time.time_ns()
        stamps = []
        for path in self.paths:
            try:
                stamps.append(stamp(os.stat(path)))
            except OSError as e:
                raise UserError(f"{path}: cannot read image: {reason(e)}") from None
        hashes: dict[str, str] = {}

        def load(i: int) -> np.ndarray:
            try:
                data = Path(self.paths[i]).read_bytes()
            except OSError as e:
                raise UserError(f"{self.paths[i]}: cannot read image: {reason(e)}") from None
            if _racy(stamps[i], since):
                hashes[str(i)] = _sha256(data)
            return decode(i, data)

        tmp = self.pixels_path.with_name(f".{self.pixels_path.name}.tmp{os.getpid()}")
        offsets, shapes, offset = [], [], 0
        try:
            with open(tmp, "wb") as out, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                # Pillow decodes with the GIL released: threads decode in parallel, in order.
                decoded = pool.map(load, range(len(self.paths)))
                # a bar on a terminal; in logs, the lines before and after
                for arr in tqdm(
                    decoded,
                    total=len(self.paths),
                    desc="decoding",
                    unit="img",
                    mininterval=1.0,
                    disable=not (announce and sys.stderr.isatty()),
                ):
                    out.write(arr.tobytes())
                    offsets.append(offset)
                    shapes.append(arr.shape[:2])
                    offset += arr.size
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.pixels_path)
        finally:
            tmp.unlink(missing_ok=True)
        index = {
            "version": VERSION,
            "pillow": PIL.__version__,
            "list": str(list_path),
            "list_sha256": self._list_sha256,
            "paths": self.paths,
            "stamps": stamps,
            "hashes": dict(sorted(hashes.items(), key=lambda kv: int(kv[0]))),
            "bytes": offset,
            "offsets": offsets,
            "shapes": [int(x) for s in shapes for x in s],
        }
        self._write_index(index)
        if announce:
            say(
                f"{list_path}: decoded {len(self.paths)} images ({offset / 1e6:.1f} MB) in "
                f"{time.perf_counter() - started:.1f} s"
            )
        return index

    def _open_pixels(self):
        """The pixels file this index describes: this process's open file, or in a loader worker the one its
        owner holds open (through /proc), else the file at the path if it is still that one."""
        if os.getpid() == self._owner and self._file is not None:
            return self._file
        for path in (f"/proc/{self._owner}/fd/{self._fd}", self.pixels_path):
            try:
                f = open(path, "rb")
            except OSError:
                continue
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) == self._file_id:
                return f
            f.close()
        raise UserError(
            f"{self.pixels_path}: decoded again by another process (its split file or images changed) "
            "while this one was reading it; run this one again"
        )

    def _pixels(self) -> np.memmap:
        if self._map is None or self._pid != os.getpid():  # each loader worker maps it for itself
            f = self._open_pixels()
            self._map, self._pid = np.memmap(f, dtype=np.uint8, mode="r"), os.getpid()
            if f is not self._file:
                f.close()  # (the map stays)
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
        hwc = np.array(self._pixels()[start : start + h * w * 3]).reshape(h, w, 3)
        return torch.from_numpy(hwc).permute(2, 0, 1)

    def __getstate__(self):  # a worker maps the file again rather than pickling the map
        state = dict(self.__dict__)
        state["_map"] = state["_pid"] = state["_file"] = None
        return state
