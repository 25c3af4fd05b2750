"""One chunk's tokens, record and KV written to a file that another data directory of the
same model imports, and imported there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvchunks.common import InvalidInput, export_target, import_source
from kvchunks.service.chunk_store import ChunkStore
from kvchunks.service.chunks import chunk_address
from kvchunks.store.chunk import ChunkInfo, ChunkRecord
from kvchunks.store.hashing import content_hash
from kvchunks.store.kv_file import read_kv_file, write_kv_file
from kvchunks.vocabulary import check_flag


def export_chunk(store: ChunkStore, chunk: ChunkInfo, path: str | Path, force: bool) -> Path:
    """Write one chunk (tokens, record and KV) to a file (see common.export_target)."""
    check_flag("force", force)
    if chunk.layout == "view":
        raise InvalidInput("a view has no KV of its own: export the chunks it reads")
    target = export_target(store.home, path, force)
    kv = store.tiers.kv_of(chunk)  # a read: the chunk stays in the tier it is in
    if kv is None:  # lost everywhere: recomputed, which leaves it in the pool
        with store.lock:
            kv = store.model.llm.read_kv(store.composer.owned_kv(chunk))
    k, v = kv
    write_kv_file(target, k, v, chunk.to_record(), store.model.fingerprint)
    return target


def import_chunk(store: ChunkStore, path: str | Path) -> str:
    """Add a chunk exported from a data directory of the same model, dtype and shapes;
    returns its hash."""
    file = import_source(store.home, path)
    model = store.model
    k, v, record, _ = read_kv_file(
        file, model.fingerprint, model.engine_config.dtype, model.kv_shape()
    )
    # Views over it were counted where it was exported; here there are none.
    chunk = dataclasses.replace(ChunkRecord.from_record(record), ref_count=0)
    if chunk.layout == "view" or k.shape[1] != chunk.token_count:
        raise InvalidInput(f"{file} does not hold a chunk's own KV")
    _check_address(store, chunk, file)
    with store.maker.holding() as hold:  # a call keeping nothing may make it meanwhile
        store.maker.hold(hold, [chunk.hash])
        if not store.registry.exists(chunk.hash):
            with store.lock:
                store.maker.register(chunk, [store.tiers.write(k, v, chunk)], hold)
        store.maker.keep(hold, [chunk])
    return chunk.hash


def _check_address(store: ChunkStore, chunk: ChunkRecord, file: Path) -> None:
    """Refuse a record whose hashes are not those of its tokens: stored under a real address,
    it would stand for that chunk (the same text loaded here would return it). The chunk
    address also names the chunks it was computed after, with their positions: it is
    checked when they are stored here (always, for a chunk computed after none)."""
    if chunk.content_hash != content_hash(chunk.token_ids):
        raise InvalidInput(f"{file}: the record's content hash is not that of its tokens")
    parents = store.registry.get_present(chunk.parent_chunks)
    if len(parents) < len(chunk.parent_chunks):
        return
    combine = chunk.metadata.get("combine", "")
    if not isinstance(combine, str):
        raise InvalidInput(f"{file}: the record's combination is not a name")
    address = chunk_address(
        store.model.fingerprint, parents, combine, chunk.position, chunk.token_ids
    )
    if address != chunk.hash:
        raise InvalidInput(f"{file}: the record's chunk hash is not that of its tokens")
