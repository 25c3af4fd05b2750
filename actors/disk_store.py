"""DiskStore: chunks' KV files on the disk of the node it runs on.

Files are the store's safetensors format (`store/kv_file.py`), written by the workers of its
node when chunks are made, within the budget the TierManager keeps, and checked on every
read: nothing read from disk is ever unpickled, and a file that fails its checks is not
used. It serves workers on other nodes. A plain class, wrapped by `ray.remote` at the end;
one runs on each node.
"""

from __future__ import annotations

from pathlib import Path

import ray

from kvchunks.actors.kv_transfer import KVPayload
from kvchunks.actors.remote import NAMESPACE, REGISTRY, get
from kvchunks.common import ChunkFileError, ServiceUnavailable, data_dir
from kvchunks.store.kv_file import claimed, kv_path, read_kv_file


class DiskStore:
    def __init__(self, home: str | None):
        self.home = Path(home) if home else data_dir()

    def ready(self) -> bool:
        return True

    def get(self, chunk_hash: str, fingerprint: str, dtype: str, shape: tuple) -> KVPayload | None:
        """The chunk's KV from its file, if the file is there and passes every check."""
        path = kv_path(self.home, chunk_hash)
        if not path.exists():
            return None
        try:
            k, v, _, _ = read_kv_file(path, fingerprint, dtype, shape, expect_hash=chunk_hash)
        except ChunkFileError:
            return None
        return KVPayload.from_tensors(k, v)

    def sizes(self) -> dict[str, int]:
        """hash -> bytes of each chunk's file here."""
        return {f.stem: f.stat().st_size for f in (self.home / "kv").glob("*/*.safetensors")}

    def remove(self, chunk_hash: str) -> None:
        """Remove a deleted chunk's file, unless the chunk was made again since it was deleted:
        under the file's lock, which making a chunk holds from its file to its record."""
        with claimed(self.home, chunk_hash):
            if self._deleted(chunk_hash):
                kv_path(self.home, chunk_hash).unlink(missing_ok=True)

    def _deleted(self, chunk_hash: str) -> bool:
        """Whether the registry has no such chunk; False if it cannot say (a file left with no
        chunk costs only its space; one removed under a chunk loses its KV)."""
        try:
            registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
            return get(registry.call.remote("missing", [chunk_hash]), "the registry") != []
        except (ValueError, ServiceUnavailable):  # ValueError: no registry actor
            return False


DiskStoreActor = ray.remote(DiskStore)
