"""safetensors without holding a file in memory: memory-mapped reading, streaming writing.

The format (huggingface/safetensors, its README)::

    u64 little-endian N | N bytes of JSON header (space-padded) | data
    header: {"__metadata__": {str: str}, NAME: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...}

Offsets count from the start of the data; the tensors tile it exactly, in order, with no gaps.

Reading: :class:`SafetensorsFile` validates the header (dtype, shape, offsets against each other and
against the file's size) and hands out tensors that are views of a memory map of the file, one at a
time: their resident memory is page-cache pages the kernel can drop and re-read, not a private copy.
``writable=True`` maps copy-on-write (a tensor may be modified in place; only the pages written
become private); the default maps read-only, for commands that only read, which may then
:meth:`~SafetensorsFile.drop_pages` behind them to keep their resident set at one tensor. As with
any memory map, a file truncated in place while mapped faults on access; the toolkit replaces
checkpoints by renaming a new directory into place (hf_io.atomic_dir), which leaves mapped files intact.

Writing: :func:`write_file` takes the names, dtypes and shapes up front (the header is computed
from them, before any data exists) and a callable that produces one tensor at a time; each is
written at its offset and released. The layout is safetensors' own ``save_file``'s (tensors by
dtype, widest first, then by name; header JSON compact and padded to 8 bytes), so the same tensors
give the same bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import CheckpointError

# safetensors' dtype names, in the order of its Rust Dtype enum (save_file writes later ones first)
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
          "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
NAMES = {dt: name for name, dt in DTYPES.items()}
_RANK = {name: i for i, name in enumerate(DTYPES)}
MAX_HEADER = 100_000_000  # safetensors' own limit on N
FIX = "the file is truncated or corrupt; copy it again"
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"is not a readable safetensors file ({what})", path=path, fix=FIX)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(name -> TensorInfo, metadata) of a safetensors file, validated; reads the header bytes only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} exceeds the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"could not be read ({e})", path=path, fix=FIX) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ is not a map of strings")
    start = 8 + n
    infos, spans = {}, []
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
            if not all(isinstance(s, int) and s >= 0 for s in e["shape"]) or len(e["data_offsets"]) != 2:
                raise ValueError
        except KeyError as err:
            what = f"unknown dtype {e.get('dtype')!r}" if isinstance(e, dict) and "dtype" in e else f"no {err}"
            raise _bad(path, f"tensor {name!r}: {what}") from None
        except (TypeError, ValueError, AttributeError):
            raise _bad(path, f"tensor {name!r}: malformed shape or data_offsets") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - b != numel * dtype.itemsize:
            raise _bad(path, f"tensor {name!r}: data_offsets {[b, end]} hold {end - b} bytes, its dtype and "
                             f"shape {list(shape)} {numel * dtype.itemsize}")
        spans.append((b, end, name))
        infos[name] = TensorInfo(dtype, shape, start + b, start + end)
    pos = 0
    for b, end, name in sorted(spans):
        if b != pos:
            raise _bad(path, f"tensor {name!r} starts at data offset {b}, expected {pos} (a gap or an overlap)")
        pos = end
    if start + pos != size:
        raise _bad(path, f"the tensors end at byte {start + pos}, the file has {size}")
    return infos, meta


class SafetensorsFile:
    """One safetensors file, memory-mapped on first use; tensors are views of the map.

    ``writable``: map copy-on-write (tensors may be written; the file never is). Otherwise the map
    is read-only: writing to a tensor is a fault, and :meth:`drop_pages` is always safe."""

    def __init__(self, path: str | Path, writable: bool = False):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors stores little-endian data; this machine is big-endian", path=path)
        self.path = Path(path)
        self.writable = writable
        self.infos, self.metadata = read_header(self.path)
        self._mm = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != max((i.end for i in self.infos.values()), default=size):
                        raise _bad(self.path, "its size changed since its header was read")
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if self.writable else mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"could not be mapped ({e})", path=self.path, fix=FIX) from None
        return self._mm

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a view of the map (a copy only when its bytes are not aligned to its dtype)."""
        i = self.infos[name]
        numel = i.nbytes // i.dtype.itemsize
        if numel == 0:
            return torch.empty(i.shape, dtype=i.dtype)
        mm = self._map()
        if i.begin % i.dtype.itemsize:  # another writer's unaligned layout: copy these bytes only
            return torch.frombuffer(bytearray(mm[i.begin:i.end]), dtype=i.dtype).reshape(i.shape)
        with warnings.catch_warnings():  # read-only maps: torch warns that it cannot mark tensors read-only
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(mm, dtype=i.dtype, count=numel, offset=i.begin).view(i.shape)

    def drop_pages(self, names: Iterable[str] | None = None) -> None:
        """Return the pages of these tensors (all: None) to the page cache; a later read faults them
        back in from the file. Only for pages never written: a read-only map, or tensors nobody
        holds (a copy-on-write page written to would lose its changes)."""
        if self._mm is None:
            return
        if names is None:
            spans = [(0, len(self._mm))]
        else:  # whole pages inside each tensor only: the pages at its ends may hold a neighbour
            spans = [(-(-self.infos[n].begin // PAGE) * PAGE, self.infos[n].end // PAGE * PAGE) for n in names]
        for b, e in spans:
            if e > b:
                self._mm.madvise(mmap.MADV_DONTNEED, b, e - b)


# ---- writing -------------------------------------------------------------------------------------

def header_bytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8 + N header bytes of a file of these tensors, and each tensor's (begin, end) data offsets,
    laid out as safetensors' save_file lays them out."""
    order = sorted(specs, key=lambda n: (-_RANK[NAMES[specs[n][0]]], n.encode()))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for name in order:
        dtype, shape = specs[name]
        numel = 1
        for s in shape:
            numel *= int(s)
        offsets[name] = (pos, pos + numel * dtype.itemsize)
        header[name] = {"dtype": NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": list(offsets[name])}
        pos += numel * dtype.itemsize
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def write_file(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
               produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
               after: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file whose tensors ``produce(name)`` makes one at a time, in file order;
    each must have its declared dtype and shape (else ValueError, and no file). ``after(name)``
    runs once a tensor is written and dropped (to release its source, e.g. :meth:`SafetensorsFile.drop_pages`)."""
    head, offsets = header_bytes(specs, metadata)
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(head)
            for name in offsets:  # header_bytes' order: the data is written front to back
                t = produce(name)
                dtype, shape = specs[name]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                del t
                if after is not None:
                    after(name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file for tensors already in memory (no serialized copy of them)."""
    write_file(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, tensors.__getitem__, metadata)
