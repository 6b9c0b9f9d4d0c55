"""The image check: every file of a folder data set is checked once, before any loader reads it, and the verdicts cached.

Why it exists: NVIDIA DALI's JPEG parser can take the whole process down (a segmentation fault,
which no Python code can catch) on a file whose markers lie about their lengths, e.g. the bytes
`FF D8 FF E0` followed by text; PIL raises an exception on the same file. So before a run's first
pass every file must pass, in worker processes:

- a cheap look at the directory entry: a regular file, not empty;
- for files whose bytes start like a JPEG (whatever their extension), a strict walk of the marker
  structure: start-of-image; every segment's length inside the file; quantisation and Huffman
  tables whose declared sizes add up to their segment; a frame header (SOF) with non-zero size
  before the first scan (SOS); the end-of-image marker after the last scan's entropy-coded data;
- a full decode by PIL: `verify()` (PNG: every chunk's CRC), then `load()` on a fresh handle
  (truncated data is an error), then the conversion to RGB the torch loader does.

A file that fails is left out of the run (the split is made after, so the other files keep their
places), named in one warning (or a one-line error with `data.on_bad_image: error`), and counted
in the run's report. Verdicts are cached in the run directory (`image_check.npz`), keyed by each
file's absolute path, size and modification time, so a rerun or a resumed run checks only new or
changed files. What the check cannot foresee (a decoder bug on a file PIL reads) is left to the
loaders' own recovery (hello_fast.data.dali.FolderBatches rebuilds its pipeline without it).
"""
from __future__ import annotations

import collections
import hashlib
import io
import multiprocessing
import os
import stat
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from hello_fast import distributed
from hello_fast._io import write_bytes
from hello_fast._progress import log, progress
from hello_fast.errors import HelloError

CACHE_NAME = "image_check.npz"
_CACHE_VERSION = 1
_PARALLEL_FROM = 256  # fewer files than this are checked in this process (a pool costs more than it saves)
_CHUNK = 64  # files per task sent to a worker
_WARN_NAMES = 100  # bad files named in the warning; all of them go into the report

# -- the JPEG marker walk ---------------------------------------------------------------------------------------------

_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_RST = frozenset(range(0xD0, 0xD8))
_SOS, _EOI, _DHT, _DQT, _DRI, _TEM = 0xDA, 0xD9, 0xC4, 0xDB, 0xDD, 0x01


def _scan_end(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data starting at `pos` ends: the first 0xFF followed by neither a stuffed
    zero, a restart marker nor another 0xFF (a fill byte); -1 if the data runs to the end of the file.

    bytes.find jumps between the 0xFF bytes (about one in 256 of compressed data), several times
    faster than a regular expression tried at every byte."""
    find, n = data.find, len(data)
    while True:
        k = find(b"\xff", pos)
        if k < 0 or k + 1 >= n:
            return -1
        after = data[k + 1]
        if after != 0x00 and after != 0xFF and not 0xD0 <= after <= 0xD7:
            return k
        pos = k + 1 if after == 0xFF else k + 2


def _segment_error(code: int, body: bytes, frame: bool) -> str | None:
    """What is wrong with the payload of one marker segment (length bytes excluded), or None."""
    name = f"0x{code:02X}"
    if code in _SOF:
        if frame:
            return "two frame headers (SOF)"
        if len(body) < 6:
            return f"frame header (SOF {name}) of {len(body) + 2} bytes"
        height, width, ncomp = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
        if body[0] not in (8, 12, 16):
            return f"frame header gives a sample precision of {body[0]} bits"
        if width == 0 or height == 0:
            return f"frame header gives an image of {width}x{height} pixels"
        if not 1 <= ncomp <= 4 or len(body) != 6 + 3 * ncomp:
            return f"frame header of {len(body) + 2} bytes for {ncomp} components"
        for k in range(ncomp):
            h, v = body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15
            if not (1 <= h <= 4 and 1 <= v <= 4) or body[8 + 3 * k] > 3:
                return f"frame header: component {k} has sampling {h}x{v}, table {body[8 + 3 * k]}"
        return None
    if code == _SOS:
        if not frame:
            return "a scan (SOS) before the frame header (SOF)"
        ns = body[0] if body else 0
        if not 1 <= ns <= 4 or len(body) != 4 + 2 * ns:
            return f"scan header of {len(body) + 2} bytes for {ns} components"
        return None
    if code == _DQT:
        pos = 0
        while pos < len(body):
            precision, table = body[pos] >> 4, body[pos] & 15
            if precision > 1 or table > 3:
                return f"quantisation table {table} of precision {precision}"
            pos += 1 + 64 * (1 + precision)
        return None if pos == len(body) and body else f"quantisation tables overrun their segment ({len(body) + 2} bytes)"
    if code == _DHT:
        pos = 0
        while pos < len(body):
            if pos + 17 > len(body):
                return f"Huffman table header overruns its segment ({len(body) + 2} bytes)"
            kind, table = body[pos] >> 4, body[pos] & 15
            count = sum(body[pos + 1 : pos + 17])
            if kind > 1 or table > 3 or count > 256:
                return f"Huffman table {kind}/{table} with {count} codes"
            pos += 17 + count
        return None if pos == len(body) and body else f"Huffman tables overrun their segment ({len(body) + 2} bytes)"
    if code == _DRI and len(body) != 2:
        return f"restart interval segment of {len(body) + 2} bytes"
    if 0x02 <= code <= 0xBF:
        return f"reserved marker {name}"
    return None


def jpeg_structure_error(data: bytes) -> str | None:
    """Why `data` (a whole file that starts with a JPEG start-of-image) is not a well-formed JPEG, or None.

    Walks the markers as a decoder's header parser does; the entropy-coded data of each scan is
    skipped up to the next marker (a jump from one 0xFF byte to the next).
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return "no JPEG start-of-image marker"
    pos, frame, scans = 2, False, 0
    while True:
        if pos >= n or data[pos] != 0xFF:
            if pos >= n:
                return "ends before the end-of-image marker (truncated)" if scans else "ends before any image data (truncated)"
            return f"byte {pos} is 0x{data[pos]:02X} where a marker must start"
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return "ends inside a marker (truncated)"
        code = data[pos]
        pos += 1
        if code == _EOI:
            return None if scans else "end-of-image marker before any image data"
        if code == _TEM:
            continue
        if code == 0x00 or code in _RST:
            return f"marker 0x{code:02X} outside image data at byte {pos - 2}"
        if pos + 2 > n:
            return f"ends inside the length of marker 0x{code:02X} (truncated)"
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            return f"marker 0x{code:02X} at byte {pos - 2} declares {length} bytes; the file has {n - pos} left"
        problem = _segment_error(code, data[pos + 2 : pos + length], frame)
        if problem:
            return problem
        frame = frame or code in _SOF
        pos += length
        if code == _SOS:
            scans += 1
            pos = _scan_end(data, pos)
            if pos < 0:
                return "image data runs to the end of the file without an end-of-image marker (truncated)"


# -- one file ---------------------------------------------------------------------------------------------------------

def _entry_error(path: str) -> str | None:
    """The checks a directory entry answers: exists, a regular file, not empty."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def image_error(path: str) -> str | None:
    """Why the file at `path` must not reach a loader, or None when it is a readable image (see the module doc)."""
    problem = _entry_error(path)
    if problem:
        return problem
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if data[:2] == b"\xff\xd8":
        problem = jpeg_structure_error(data)
        if problem:
            return f"not a well-formed JPEG: {problem}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's decompression-bomb and palette notes: not verdicts
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: a fresh handle decodes
                im.load()
                if im.width == 0 or im.height == 0:
                    return f"decodes to {im.width}x{im.height} pixels"
                if im.mode not in ("RGB", "L"):
                    im.convert("RGB")
    except UnidentifiedImageError:
        return "not an image format PIL recognises"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on foreign or damaged data
        return f"PIL cannot decode it ({type(e).__name__}: {e})"
    return None


def _check_many(paths: list[str]) -> list[str | None]:
    return [image_error(p) for p in paths]


# -- the pass over a data set -----------------------------------------------------------------------------------------

@dataclass
class ImageCheck:
    """The verdicts on one data set's files: `bad` maps each left-out file to the reason."""

    files: int
    bad: dict = field(default_factory=dict)
    checked: int = 0  # files decoded by this pass
    from_cache: int = 0  # files whose verdict came from the cache
    seconds: float = 0.0
    workers: int = 1
    mode: str = "full"  # full (structure + decode) | quick (directory entries only: data.validate false)

    @property
    def files_per_second(self) -> float:
        return self.checked / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """For results.json."""
        return {"mode": self.mode, "files": self.files, "left_out": len(self.bad), "checked": self.checked,
                "from_cache": self.from_cache, "seconds": round(self.seconds, 2),
                "files_per_second": round(self.files_per_second, 1), "bad_files": dict(self.bad)}


def _keys(paths: list[str]) -> np.ndarray:
    """A 64-bit key per file from (absolute path, size, mtime): a changed or replaced file gets a new key."""
    keys = np.empty(len(paths), dtype=np.uint64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            sig = f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}"
        except OSError:
            sig = f"{os.path.abspath(p)}\0missing"
        keys[i] = int.from_bytes(hashlib.blake2b(sig.encode(), digest_size=8).digest(), "little")
    return keys


def _read_cache(path: str | None) -> tuple[np.ndarray, dict[int, str]]:
    """(sorted keys of good files, {key: reason} of bad ones); empty when absent, foreign or damaged."""
    empty = np.empty(0, dtype=np.uint64), {}
    if not path or not os.path.isfile(path):
        return empty
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION:
                return empty
            good = np.sort(z["good"].astype(np.uint64))
            bad = dict(zip(z["bad"].astype(np.uint64).tolist(), z["reasons"].tolist()))
    except Exception as e:  # a damaged cache is only a cache: check again
        log(f"image check: ignoring the unreadable cache {path} ({type(e).__name__}: {e})")
        return empty
    return good, bad


def _write_cache(path: str, keys: np.ndarray, reasons: list[str | None]) -> None:
    good = np.sort(keys[[r is None for r in reasons]])
    bad_at = [i for i, r in enumerate(reasons) if r is not None]
    buffer = io.BytesIO()
    np.savez(buffer, version=np.array(_CACHE_VERSION), good=good, bad=keys[bad_at].astype(np.uint64),
             reasons=np.array([reasons[i] for i in bad_at], dtype=str).reshape(-1))
    write_bytes(path, buffer.getbuffer(), "image-check cache")


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _context():
    """fork where the platform has it (as the DataLoader's workers do): a worker does not re-import torch."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _isolated(path: str, ctx) -> str | None:
    """image_error of one file in a process of its own: a decoder that kills its process is a verdict."""
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as one:
        try:
            return one.submit(_check_many, [path]).result()[0]
        except BrokenProcessPool:
            return "the decoder crashed on it (its checking process died)"


def _decode_all(paths: list[str], workers: int) -> list[str | None]:
    """image_error of every path, over `workers` processes, with a progress bar.

    At most 2 chunks per worker are in flight; if a worker dies (a decoder crash, which would
    have taken the run down in-process), the files of the chunks in flight are checked again
    one process each, so the culprit is named and the pass goes on."""
    out: list[str | None] = [None] * len(paths)
    bar = progress(total=len(paths), desc="checking images", unit="file", disable_below=_PARALLEL_FROM)
    with bar:
        if workers <= 1 or len(paths) < _PARALLEL_FROM:
            for k, p in enumerate(paths):
                out[k] = image_error(p)
                bar.update(1)
            return out
        ctx = _context()
        todo = collections.deque(range(0, len(paths), _CHUNK))
        while todo:
            running: dict = {}
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    while todo or running:
                        while todo and len(running) < 2 * workers:
                            start = todo.popleft()
                            running[pool.submit(_check_many, paths[start : start + _CHUNK])] = start
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for f in finished:
                            verdicts = f.result()
                            start = running.pop(f)
                            out[start : start + len(verdicts)] = verdicts
                            bar.update(len(verdicts))
            except BrokenProcessPool:
                for f, start in running.items():
                    chunk = paths[start : start + _CHUNK]
                    ok = f.done() and not f.cancelled() and f.exception() is None
                    out[start : start + len(chunk)] = f.result() if ok else [_isolated(p, ctx) for p in chunk]
                    bar.update(len(chunk))
    return out


def check_images(paths: list[str], *, cache: str | None = None, full: bool = True, workers: int | None = None) -> ImageCheck:
    """Verdicts on `paths` (see the module doc): from `cache` where current, else checked now (then cached).

    `full=False` (data.validate: false) answers from the directory entries alone: no decode, no cache.
    The cache is rewritten to hold exactly these files' verdicts. Under torchrun rank 0 checks
    and writes the cache while the other ranks wait, then read it.
    """
    start = time.time()
    if not full:
        bad = {p: r for p in paths if (r := _entry_error(p)) is not None}
        return ImageCheck(len(paths), bad, mode="quick", seconds=time.time() - start)
    world = distributed.world()
    shared = cache is not None and world.distributed  # one rank checks, the others read its cache
    if shared and not world.main:
        distributed.barrier()  # rank 0 checks and writes the cache
    keys = _keys(paths)
    good, cached_bad = _read_cache(cache)
    known_good = np.isin(keys, good)
    reasons: list[str | None] = [None if known_good[i] else cached_bad.get(int(k), "?") for i, k in enumerate(keys)]
    todo = [i for i, r in enumerate(reasons) if r == "?"]
    n_workers = workers or _workers()
    if todo and shared and not world.main:
        raise HelloError(f"image check: rank {world.rank} found {len(todo)} files missing from rank 0's cache {cache} "
                         "(is the run directory on a filesystem every rank shares?)")
    seconds = 0.0
    if todo:
        t0 = time.time()
        for i, r in zip(todo, _decode_all([paths[i] for i in todo], n_workers)):
            reasons[i] = r
        seconds = time.time() - t0
        if cache and world.main:
            _write_cache(cache, keys, reasons)
    if shared and world.main:
        distributed.barrier()
    bad = {p: r for p, r in zip(paths, reasons) if r is not None}
    workers_used = n_workers if len(todo) >= _PARALLEL_FROM else 1
    return ImageCheck(len(paths), bad, checked=len(todo), from_cache=len(paths) - len(todo), seconds=seconds,
                      workers=workers_used)


def screen(paths: list[str], *, on_bad_image: str, cache: str | None = None, full: bool = True) -> ImageCheck:
    """Check `paths`, say what was found, and stop (on_bad_image: error) or warn once naming every bad file."""
    result = check_images(paths, cache=cache, full=full)
    if result.mode == "quick":
        log(f"image check: data.validate is false: {len(paths)} files taken unchecked (directory entries only)")
    elif result.checked:
        log(f"image check: {result.checked} files checked in {result.seconds:.1f} s ({result.files_per_second:.0f} files/s, "
            f"{result.workers} process{'es' if result.workers > 1 else ''})"
            + (f", {result.from_cache} from the cache" if result.from_cache else "") + f", {len(result.bad)} left out")
    else:
        log(f"image check: all {len(paths)} verdicts from the cache {cache} (cache hit), {len(result.bad)} left out")
    if not result.bad:
        return result
    lines = [f"  {p}: {r}" for p, r in list(result.bad.items())[:_WARN_NAMES]]
    if len(result.bad) > _WARN_NAMES:
        lines.append(f"  ... and {len(result.bad) - _WARN_NAMES} more (all listed in the run's results.json)")
    if on_bad_image == "error":
        named = "; ".join(f"{p}: {r}" for p, r in list(result.bad.items())[:5])
        more = f"; and {len(result.bad) - 5} more" if len(result.bad) > 5 else ""
        raise HelloError(f"{len(result.bad)} unreadable image file(s): {named}{more} (data.on_bad_image: skip leaves them out)")
    warnings.warn(f"leaving out {len(result.bad)} unreadable image file(s) of {len(paths)} "
                  f"(data.on_bad_image: error stops instead):\n" + "\n".join(lines), RuntimeWarning, stacklevel=2)
    return result


def images_summary(*sets) -> dict | None:
    """The image check's counts for results.json, plus the files a loader left out later; None for in-memory sets."""
    check = next((s.check for s in sets if s.check is not None), None)
    if check is None:
        return None
    out = check.summary()
    out["left_out_while_reading"] = sorted({s.files[i] for s in sets for i in getattr(s, "bad", ())})
    return out
