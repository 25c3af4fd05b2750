"""The disk tier: every chunk that owns KV has a safetensors file from its creation on, so
its KV survives the process and can be shipped or loaded again without a recompute."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from kvchunks.common import CapacityError, ChunkFileError, DtypeMismatch
from kvchunks.service.kv_sources import KV
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.host_memory import HostMemory
from kvchunks.store.kv_file import (
    claimed,
    kv_path,
    read_kv_file,
    remove_partial_files,
    stored_nbytes,
    write_kv_file,
)

# (hash, bytes) -> whether a new file of that size fits a budget kept elsewhere (a cluster's,
# for every worker of a node); it counts the file when it does.
AdmitFile = Callable[[str, int], bool]


class ChunkFiles:
    """Chunk KV files under `<home>/kv`, checked on every read and kept within a byte budget.
    It is also a KV source (see kv_sources.py)."""

    def __init__(
        self,
        home: Path,
        fingerprint: str,
        dtype: str,
        shape: tuple,  # [layers, None, kv_heads, head_dim]
        host: HostMemory,
        stats: Counter[str],
        budget_bytes: int | None = None,
        compression: str = "none",  # or "bf16" (see policies.budgets)
        admit: AdmitFile | None = None,  # instead of budget_bytes
    ):
        self.home, self.fingerprint, self.dtype, self.shape = home, fingerprint, dtype, shape
        self.host, self.stats = host, stats
        self.budget_bytes, self.compression, self.admit = budget_bytes, compression, admit
        remove_partial_files(home)  # left by a process killed while writing KV

    def path(self, chunk_hash: str) -> Path:
        return kv_path(self.home, chunk_hash)

    def claimed(self, chunk_hash: str) -> contextlib.AbstractContextManager[None]:
        """Hold the chunk's file against the other processes on this data directory."""
        return claimed(self.home, chunk_hash)

    def exists(self, chunk_hash: str) -> bool:
        return self.path(chunk_hash).exists()

    def load(self, chunk: ChunkInfo) -> KV | None:
        """The chunk's KV from its file, if it is there and sound (into host-memory buffers
        the tier keeps for reuse)."""
        kv = self._read(chunk, self.host.buffer)
        if kv is not None:
            self.stats["file_loads"] += 1
        return kv

    def is_sound(self, chunk: ChunkInfo) -> bool:
        """Whether the chunk's file is there and passes every check (its KV is read, into
        memory of its own: the tier's buffers are for KV it keeps)."""
        return self._read(chunk, None) is not None

    def repair(self, chunk: ChunkInfo, copy: Callable[[], KV | None]) -> bool:
        """Whether the chunk's file is sound, written again from `copy()` if it was not
        (False: it was not, and there was no copy). Called with the file `claimed`."""
        if self.is_sound(chunk):
            return True
        kv = copy()
        if kv is None:
            return False
        self.write(chunk, *kv)
        return True

    def _read(self, chunk: ChunkInfo, buffer: Callable[[int], torch.Tensor] | None) -> KV | None:
        path = self.path(chunk.hash)
        if not path.exists():
            return None
        layers, _, heads, dim = self.shape
        shape = (layers, chunk.token_count, heads, dim)
        try:
            k, v, _, _ = read_kv_file(
                path, self.fingerprint, self.dtype, shape, buffer, expect_hash=chunk.hash
            )
        except DtypeMismatch as e:  # sound, but another dtype's: recomputing would mix them
            raise DtypeMismatch(f"chunk {chunk.hash[:12]}", e.found, e.expected) from None
        except ChunkFileError:  # a damaged file is never used: the chunk is recomputed instead
            self.stats["bad_files"] += 1
            return None
        return k, v

    def write(self, chunk: ChunkInfo, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the chunk's file (replacing a damaged one), within the disk budget."""
        self._check_budget(chunk.hash, stored_nbytes(k, v, self.compression))
        record = chunk.to_record()
        write_kv_file(self.path(chunk.hash), k, v, record, self.fingerprint, self.compression)

    def _check_budget(self, chunk_hash: str, needed: int) -> None:
        if self.admit is not None:
            if not self.admit(chunk_hash, needed):
                raise CapacityError(
                    f"the disk tier of this node is full, chunk needs {needed} bytes; delete "
                    "chunks or raise KVCHUNKS_DISK_BYTES"
                )
            return
        limit = self.budget_bytes
        if limit is not None and self.used_bytes() + needed > limit:
            raise CapacityError(
                f"the disk tier is full: {self.used_bytes()} of {limit} bytes used, chunk needs "
                f"{needed}; delete chunks or raise KVCHUNKS_DISK_BYTES"
            )

    def remove(self, chunk_hash: str) -> None:
        self.path(chunk_hash).unlink(missing_ok=True)

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.home / "kv").rglob("*.safetensors"))
