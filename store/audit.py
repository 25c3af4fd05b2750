"""The registry's invariants, checked by the property tests and the soak benchmark.

Each broken invariant is one line in the returned list; an empty list means all hold. Run on
a quiet registry: a write under way can make a consistent state look broken for a moment.
"""

from __future__ import annotations

from collections import Counter

from kvchunks.store.registry import ChunkRegistry


def registry_violations(registry: ChunkRegistry) -> list[str]:
    chunks = {c.hash: c for c in registry.list_chunks()}
    # A chunk's reference count is exactly the number of views that read it.
    readers = Counter(p for c in chunks.values() if c.layout == "view" for p in c.parent_chunks)
    out = [
        f"chunk {h[:12]}: ref_count {c.ref_count}, but {readers[h]} view(s) read it"
        for h, c in chunks.items()
        if c.ref_count != readers[h]
    ]
    out += [
        f"context {name}: active chunk {h[:12]} does not exist"
        for name in registry.contexts()
        for h in registry.active(name)
        if h not in chunks
    ]
    # Every call lets go of what it holds as it ends, whether it succeeds or fails.
    out += [f"chunk {h[:12]}: held by a call that has ended" for h in registry.held()]
    for h in chunks:  # provenance edges join existing chunks only
        edges = set(registry.parents(h)) | set(registry.children(h))
        out += [
            f"chunk {h[:12]}: provenance edge to missing {e[:12]}"
            for e in sorted(edges - set(chunks))
        ]
    return out
