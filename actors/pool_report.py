"""What a worker's pool and host memory hold, reported to the registry actor whenever it
changes, so that the router sends each request to the worker that holds its chunks."""

from __future__ import annotations

import threading

import ray

from kvchunks.actors.remote import get
from kvchunks.service.tiers import Tiers


class PoolReport:
    def __init__(self, registry: ray.actor.ActorHandle, worker: str, tiers: Tiers):
        self.registry, self.worker, self.tiers = registry, worker, tiers
        self.token_bytes = tiers.model.kv_bytes(1)
        self.reported: dict[str, str] | None = None  # hash -> tier, as last reported
        self.lock = threading.Lock()  # calls and background prefetches both report

    def send(self, again: bool = False) -> None:
        """Tell the registry what the pool and host memory hold, when that changed (or
        `again`: a restarted registry actor has lost its map). Chunks deleted through other
        workers meanwhile, which the registry names in its answer, are dropped here."""
        with self.lock:
            if again:
                self.reported = None
            while deleted := self._send_once():  # loaded here while deleted elsewhere
                for chunk_hash in deleted:
                    self.tiers.forget(chunk_hash)

    def _send_once(self) -> list[str]:
        tiers = self.tiers
        with tiers.lock:  # background transfers change the pool meanwhile
            held_tiers = dict.fromkeys(tiers.kv, "gpu") | dict.fromkeys(tiers.host.kv, "cpu")
            if held_tiers == self.reported:
                return []
            held = {h: self.kv_bytes(segments) for h, segments in tiers.kv.items()}
            held |= {h: k.nbytes + v.nbytes for h, (k, v) in tiers.host.kv.items()}
            blocks = self.blocks()
        report = self.registry.report.remote(self.worker, held_tiers, held, blocks)
        deleted = get(report, "registry report")
        self.reported = held_tiers
        return deleted

    def kv_bytes(self, segments: list) -> int:
        return sum(s.length for s in segments) * self.token_bytes

    def blocks(self) -> dict[str, int]:
        usage = self.tiers.model.llm.pool_usage()
        return {"blocks_free": usage["free"], "blocks_total": usage["blocks"]}
