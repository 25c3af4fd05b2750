"""The store's invariants, checked after the fact (tests, the soak benchmark, `kvchunks
status`): every active chunk's KV can be had, and each pool block is owned exactly as its
reference count says."""

from __future__ import annotations

from collections import Counter

from kvchunks.service.pieces import owners
from kvchunks.service.tiers import Tiers
from kvchunks.store.audit import registry_violations


def violations(tiers: Tiers) -> list[str]:
    """Broken invariants of the registry and of this store (empty: all hold)."""
    registry = tiers.registry
    out = registry_violations(registry)
    active = registry.active_anywhere()
    with tiers.lock:
        for chunk in registry.get_present(active):
            out += [
                f"active chunk {chunk.hash[:12]}: KV of {owner.hash[:12]} cannot be loaded"
                for owner in owners(registry, chunk)
                if owner.hash not in tiers.kv
                and owner.hash not in tiers.host
                and tiers.files.load(owner) is None
            ]
        out += pool_violations(tiers)
    return out


def pool_violations(tiers: Tiers) -> list[str]:
    registered = set(tiers.kv) | set(tiers.host.kv)
    out = [
        f"chunk {h[:12]}: KV held, but not in the registry"
        for h in sorted(set(tiers.registry.missing(registered)))
    ]
    out += [
        f"chunk {h[:12]}: KV both in the pool and in host memory"
        for h in sorted(set(tiers.kv) & set(tiers.host.kv))
    ]
    if not tiers.model.started:
        return out
    bm = tiers.model.llm.block_manager
    owned = Counter(b for segments in tiers.kv.values() for s in segments for b in s.blocks)
    owned.update(b for c in tiers.compositions.values() for b in c.segment.blocks)
    owned.update(b for s in tiers.opening or [] for b in s.blocks)
    free = set(bm.free_ids)
    for block in range(bm.num_blocks):
        if bm.ref_counts[block] != owned[block] or (block in free) == bool(owned[block]):
            out.append(
                f"pool block {block}: ref count {bm.ref_counts[block]}, held by "
                f"{owned[block]} resident segment(s), {'free' if block in free else 'in use'}"
            )
    return out
