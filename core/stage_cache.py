"""Finished stage results on disk (the inversion, the keyframe plan), keyed by everything that determines them.

Inverting 10,000 frames takes about 20 minutes, keyframe selection minutes more; ComfyUI forgets both when it
restarts. A finished stage's arrays are kept as one safetensors file per result, named by the stage and a
digest (core/resume.py's Fingerprint) of its inputs that the host computes: the latents, the model's weights
and patches, the conditioning, every setting and the source of the code that computes it. A run whose key
matches loads the file instead of computing.

The file is written here rather than by safetensors' save_file, which builds the whole file in memory (a
16 GiB trajectory would be copied into RAM): the same format (8-byte header length, JSON header padded with
spaces to 8 bytes, then every tensor's little-endian bytes back to back), streamed from the arrays, which
may be memory-mapped, in blocks. Tensors are ordered by falling item size, so each one starts aligned to its
item size, and are loaded as copy-on-write memory maps of the file (np.memmap, mode "c"): a large
trajectory is never read into RAM at once, and code that writes into a loaded array cannot change the file.
Any safetensors reader reads these files.

Every tensor has a checksum (blake2b of its dtype, shape and bytes) and the header one more over the stage,
key, scalars and tensor checksums, all in the safetensors metadata. A load checks the file size against the
header (truncation) and every checksum (a damaged entry: loading reads the whole entry once, ~1 GB/s); a bad
entry is removed and the stage computed again, never used. Files are written to a temporary name and
renamed, so a crash mid-write leaves no entry. The folder has a size limit shared with nothing else; the
least recently used entries (a hit refreshes an entry's time) are evicted first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from dataclasses import dataclass

import numpy as np
import torch

FORMAT = "longedit-stage-cache 1"
SUFFIX = ".safetensors"
PARTIAL = ".partial"
BLOCK_BYTES = 64 * 2**20  # streamed to and from disk in blocks this size: bounded RAM at any array size
IN_RAM_BYTES = 2**20  # smaller tensors are read into RAM; larger ones are memory-mapped
ALIGN = 8  # safetensors pads its header to this
DISK_MARGIN = 0.95  # an entry is written only if it fits this share of the free disk

# safetensors dtype names; torch's bfloat16 is stored as BF16 and comes back as a torch tensor
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}


@dataclass(frozen=True)
class CachedStage:
    arrays: dict  # name -> np.ndarray (memory-mapped when large) or torch.Tensor (what was saved as one)
    info: dict  # the JSON-able scalars and settings saved with it
    path: str


def source_digest(*sources) -> str:
    """A digest of the source files of `sources` (modules, or paths of modules that need not be importable
    here): a result computed by other code is a different result."""
    digest = hashlib.blake2b(digest_size=16)
    for source in sources:
        with open(source if isinstance(source, str) else source.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _as_numpy(value) -> tuple[np.ndarray, str, bool]:
    """(little-endian array, safetensors dtype name, came from torch) of a tensor or array, without copying
    a contiguous array (a memory map stays one)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), "BF16", True
        return _as_numpy(t.numpy())[0], DTYPE_NAMES[np.dtype(t.numpy().dtype)], True
    array = np.asarray(value)
    if array.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot store arrays of {array.dtype}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array), DTYPE_NAMES[array.dtype.newbyteorder("=")], False


def _blocks(array: np.ndarray):
    """The bytes of a C-contiguous array in blocks of about BLOCK_BYTES (views, no copies)."""
    flat = array.reshape(-1)
    step = max(1, BLOCK_BYTES // max(1, array.itemsize))
    for i in range(0, flat.size, step):
        yield memoryview(np.ascontiguousarray(flat[i:i + step])).cast("B")


def _tensor_digest(dtype: str, shape, blocks) -> str:
    digest = hashlib.blake2b(f"{dtype}{list(shape)}".encode(), digest_size=32)
    for block in blocks:
        digest.update(block)
    return digest.hexdigest()


def _entry_digest(stage: str, key: str, info: str, checksums: dict) -> str:
    text = json.dumps([FORMAT, stage, key, info, sorted(checksums.items())])
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


def _header(layout: dict, metadata: dict) -> bytes:
    header = json.dumps({"__metadata__": metadata, **layout}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % ALIGN)


class StageCache:
    """Finished stage results in `folder`, at most `limit_bytes` in all."""

    def __init__(self, folder: str, limit_bytes: int):
        self.folder, self.limit_bytes = folder, limit_bytes

    def path(self, stage: str, key: str) -> str:
        return os.path.join(self.folder, f"{stage}-{key[:40]}{SUFFIX}")

    # ---- saving ----

    def save(self, stage: str, key: str, arrays: dict, info: dict) -> str | None:
        """Store a finished result; returns its path, or None when it was not stored (too large for the limit
        or the free disk, or the write failed: the run goes on, only the cache misses it)."""
        entries = {name: _as_numpy(value) for name, value in arrays.items()}
        # falling item size: every tensor starts at a multiple of its item size (the header is padded to 8)
        order = sorted(entries, key=lambda name: (-entries[name][0].itemsize, name))
        layout, offset = {}, 0
        for name in order:
            array, dtype, _ = entries[name]
            layout[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        info_text = json.dumps(info, sort_keys=True)
        torch_names = sorted(name for name in entries if entries[name][2])
        placeholder = {name: "0" * 64 for name in order}

        def metadata(checksums):
            return {"format": FORMAT, "stage": stage, "key": key, "info": info_text,
                    "torch": json.dumps(torch_names), "checksums": json.dumps(checksums, sort_keys=True),
                    "checksum": _entry_digest(stage, key, info_text, checksums)}

        header = _header(layout, metadata(placeholder))
        size = 8 + len(header) + offset
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:  # e.g. a read-only user directory: the run goes on uncached
            logging.warning(f"LongEdit: not caching the {stage} result: {error}")
            return None
        if size > self.limit_bytes:
            logging.warning(f"LongEdit: not caching the {stage} result ({size / 2**30:.2f} GiB): larger than the "
                            f"cache's limit of {self.limit_bytes / 2**30:.2f} GiB.")
            return None
        self.evict(room_for=size)
        free = shutil.disk_usage(self.folder).free
        if size > free * DISK_MARGIN:
            logging.warning(f"LongEdit: not caching the {stage} result ({size / 2**30:.2f} GiB): only "
                            f"{free / 2**30:.2f} GiB are free in {self.folder}.")
            return None
        target = self.path(stage, key)
        temporary = os.path.join(self.folder, f".{os.path.basename(target)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}")
        try:
            with open(temporary, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header)
                checksums = {}
                for name in order:
                    array, dtype, _ = entries[name]
                    digest = hashlib.blake2b(f"{dtype}{list(array.shape)}".encode(), digest_size=32)
                    for block in _blocks(array):
                        digest.update(block)
                        f.write(block)
                    checksums[name] = digest.hexdigest()
                final = _header(layout, metadata(checksums))
                assert len(final) == len(header), "checksums changed the header's length"
                f.seek(8)
                f.write(final)
            os.replace(temporary, target)  # atomic: an entry is whole or absent
        except OSError as error:  # a full disk or a folder that cannot be written: the run itself goes on
            logging.warning(f"LongEdit: could not cache the {stage} result in {self.folder}: {error}")
            if os.path.exists(temporary):
                os.remove(temporary)
            return None
        return target

    # ---- loading ----

    def load(self, stage: str, key: str, verify: bool = True) -> CachedStage | None:
        """The saved result of `stage` for `key`, if there is one whose key, size and checksums are right.
        A damaged or foreign entry is removed (the run computes and rewrites it). `verify` False skips the
        tensor checksums (only for an entry this process has just written)."""
        path = self.path(stage, key)
        if not os.path.exists(path):
            return None
        try:
            cached = self._read(path, stage, key, verify)
        except Exception as error:  # truncated, corrupt or foreign: the run recomputes
            logging.warning(f"LongEdit: the cached {stage} result {path} is damaged or stale ({error}); "
                            "computing it again.")
            os.remove(path)
            return None
        os.utime(path)  # recently used: evicted last
        return cached

    def _read(self, path: str, stage: str, key: str, verify: bool) -> CachedStage:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > file_size - 8:
                raise ValueError("truncated header")
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        if metadata.get("format") != FORMAT or metadata.get("stage") != stage or metadata.get("key") != key:
            raise ValueError("another stage, key or format")
        checksums = json.loads(metadata["checksums"])
        if _entry_digest(stage, key, metadata["info"], checksums) != metadata["checksum"]:
            raise ValueError("the header's checksum does not match")
        if set(checksums) != set(header):
            raise ValueError("the tensors do not match their checksums")
        start = 8 + length
        spans = sorted((entry["data_offsets"], name) for name, entry in header.items())
        end = 0
        for (begin, stop), name in spans:
            if begin != end:
                raise ValueError(f"tensor {name} does not follow the one before it")
            end = stop
        if start + end != file_size:
            raise ValueError(f"{file_size} bytes where the header describes {start + end} (truncated?)")
        torch_names = set(json.loads(metadata["torch"]))
        arrays = {}
        for name, entry in header.items():
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, stop = entry["data_offsets"]
            array = self._array(path, start + begin, stop - begin, dtype, shape)
            if verify and _tensor_digest(dtype, shape, _blocks(array)) != checksums[name]:
                raise ValueError(f"tensor {name} fails its checksum")
            if name in torch_names:
                tensor = torch.from_numpy(np.array(array) if isinstance(array, np.memmap) else array)
                array = tensor.view(torch.bfloat16) if dtype == "BF16" else tensor
            arrays[name] = array
        return CachedStage(arrays=arrays, info=json.loads(metadata["info"]), path=path)

    @staticmethod
    def _array(path: str, offset: int, nbytes: int, dtype: str, shape: tuple) -> np.ndarray:
        numpy_dtype = np.dtype(np.int16 if dtype == "BF16" else NUMPY_DTYPES[dtype]).newbyteorder("<")
        if int(np.prod(shape)) * numpy_dtype.itemsize != nbytes:
            raise ValueError(f"shape {shape} of {dtype} does not fill its {nbytes} bytes")
        if nbytes <= IN_RAM_BYTES:
            with open(path, "rb") as f:
                f.seek(offset)
                return np.frombuffer(bytearray(f.read(nbytes)), dtype=numpy_dtype).reshape(shape)
        return np.memmap(path, dtype=numpy_dtype, mode="c", offset=offset, shape=shape)  # copy-on-write

    # ---- size limit ----

    def evict(self, room_for: int = 0) -> None:
        """Delete the least recently used entries until the folder plus `room_for` bytes fits its limit, and
        partial files that no running process is writing."""
        if not os.path.isdir(self.folder):
            return
        entries = []
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.endswith(PARTIAL):
                if not _writer_alive(name):
                    _remove(path)
            elif name.endswith(SUFFIX):
                entries.append(path)
        entries.sort(key=os.path.getmtime)
        total = sum(os.path.getsize(p) for p in entries)
        for path in entries:
            if total + room_for <= self.limit_bytes:
                break
            total -= os.path.getsize(path)
            _remove(path)  # a result in use stays readable where it is memory-mapped (POSIX)


def _writer_alive(partial_name: str) -> bool:
    """Whether the process named in a partial file's name (.<entry>.<pid>.<id>.partial) still runs."""
    try:
        pid = int(partial_name.split(".")[-3])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # no permission to signal it (alive), or a platform without signals: keep it
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError as error:  # e.g. memory-mapped on Windows; tried again at the next eviction
        logging.warning(f"LongEdit: could not evict {path}: {error}")
