"""Prometheus metrics, named with the `kvchunks:` prefix as vLLM and SGLang use theirs.

Counters and histograms are updated by the routes; the pool, host and disk gauges and the
store's own counters (loads by source, evictions, prefetches) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The store's counters (ChunkStore.stats) exported as `kvchunks:<name>_total`.
STORE_COUNTERS = {
    "file_loads": "chunk KV loads from its file (the disk tier)",
    "shipped": "chunk KV loads from another worker's pool or the HostStore",
    "recomputes": "chunks whose KV was lost and computed again",
    "pool_hits": "chunk KV asked for and found in the pool",
    "pool_misses": "chunk KV asked for and brought into the pool",
    "evictions": "chunks moved out of the pool to make room",
    "prefetched": "chunk KV brought into the pool ahead of use",
    "prefetch_skipped": "prefetches given up (no room, or the chunk was deleted)",
    "prefetch_hits": "prefetched chunk KV that a request then found in the pool",
    "load_waits": "loads that waited for the same chunk's load in flight (a late prefetch)",
    "composition_hits": "compositions whose derived KV was kept from an earlier request",
    "composition_tokens_recomputed": "tokens recomputed to make derived KV",
}


class Metrics:
    def __init__(self, usage: Callable[[], dict]):
        """usage() -> {"stats": {...}, "pool": {...} | None, "host_bytes", "disk_bytes"}."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvchunks:requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "kvchunks:prompt_tokens",
            "prompt tokens of generations (context included)",
            registry=self.registry,
        )
        self.reused_tokens = Counter(
            "kvchunks:prompt_tokens_reused",
            "prompt tokens whose stored KV was used",
            registry=self.registry,
        )
        self.recomputed_tokens = Counter(
            "kvchunks:prompt_tokens_recomputed",
            "context tokens whose KV was computed again for a composition",
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "kvchunks:generation_tokens", "tokens generated", registry=self.registry
        )
        self.ttft = Histogram(
            "kvchunks:time_to_first_token_seconds",
            "time to first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.per_token = Histogram(
            "kvchunks:time_per_output_token_seconds",
            "time per output token after the first",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(usage))

    def observe_generation(self, result, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.reused_tokens.inc(cached_tokens)
        self.recomputed_tokens.inc(result.tokens_recomputed)
        self.generation_tokens.inc(len(result.token_ids))
        if result.token_ids:
            self.ttft.observe(result.ttft_s)
        if len(result.token_ids) > 1 and result.tokens_per_s > 0:
            self.per_token.observe(1 / result.tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    """The store's counters and the tiers' use, read at scrape time."""

    def __init__(self, usage: Callable[[], dict]):
        self.usage = usage

    def describe(self):
        return []

    def collect(self):
        usage = self.usage()
        stats = usage.get("stats", {})
        for name, help_text in STORE_COUNTERS.items():
            family = CounterMetricFamily(f"kvchunks:{name}", help_text)
            family.add_metric([], stats.get(name, 0))
            yield family
        pool = usage.get("pool") or {}
        for name, value, help_text in (
            ("pool_blocks", pool.get("blocks", 0), "KV pool blocks"),
            ("pool_blocks_free", pool.get("free", 0), "free KV pool blocks"),
            ("host_bytes", usage.get("host_bytes", 0), "KV bytes held in host memory"),
            ("disk_bytes", usage.get("disk_bytes", 0), "KV bytes in chunk files"),
        ):
            gauge = GaugeMetricFamily(f"kvchunks:{name}", help_text)
            gauge.add_metric([], value)
            yield gauge
