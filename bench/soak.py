"""Many clients against one service at once, then proof that nothing went wrong.

Each client works in its own context over the shared pool for --seconds: it loads documents,
activates and deactivates them (and a few documents every client shares, and its own prompts
and answers), composes and splits them, generates, deletes what it made, and moves chunks
between tiers. Afterwards:

- every worker's invariants hold (ChunkStore.violations: reference counts, loadable active
  chunks, pool blocks owned exactly once, no dangling provenance);
- every chunk a client was told it has, and did not delete, is there with its tokens, and
  its KV loads;
- every answer equals a sequential replay: the same chunks activated in the same order, in
  the same mode, the same prompt, one request at a time after the run (documents and views
  deleted meanwhile are made again; an answer that read a prompt or answer chunk deleted
  since cannot be replayed and is counted as such).

Errors are counted by type; only the documented refusals (below) are expected. Prints one
JSON object last, with `ops_per_s`, latency percentiles per operation and
`invariant_violations`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ray

from kvchunks.actors import service
from kvchunks.actors.client import Client, connect
from kvchunks.actors.remote import NAMESPACE
from kvchunks.common import (
    CapacityError,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    ContextWindowExceeded,
)
from kvchunks.engine import SamplingParams
from kvchunks.engine.checkpoint import resolve_model

# What a client may be told under load without anything being wrong.
REFUSALS = (ChunkInUse, ContextWindowExceeded, CapacityError, ConcurrentChange)
MODES = ("reuse", "exact", "realign")
# Per context, so that eight contexts' active chunks (which are never evicted) fit one pool.
ACTIVE_TOKENS, ACTIVE_CHUNKS = 500, 2
ANSWER = SamplingParams(temperature=0, max_tokens=8)
WORDS = [
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
    "marble",
    "nectar",
    "obsidian",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "violet",
    "willow",
    "zephyr",
]


def document(rng: random.Random, title: str) -> str:
    facts = [
        f"The {rng.choice(WORDS)} of {title} is {rng.choice(WORDS)}."
        for _ in range(rng.randint(4, 16))
    ]
    return f"{title}. " + " ".join(facts)


@dataclass
class Generation:
    mode: str
    active: list[str]
    prompt: str
    token_ids: list[int]


@dataclass
class Worklog:
    """What one client did and was told."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)


class SoakClient:
    """One client's loop: a random operation at a time on its own context."""

    def __init__(self, client: Client, index: int, shared: dict[str, int], recipes: dict):
        self.client, self.index = client, index
        self.rng = random.Random(index)
        self.mode = MODES[index % len(MODES)]
        self.shared = shared  # hash -> tokens of the documents every client reads
        self.mine: dict[str, int] = {}  # hash -> tokens of what it made and did not delete
        self.active: list[str] = []
        self.recipes = recipes  # hash -> how to make the chunk again (for the replay)
        self.log = Worklog()
        self.made = 0
        client.configure(mode=self.mode)
        client.clear()

    def run(self, deadline: float) -> Worklog:
        operations = [
            (self.load, 4),
            (self.activate, 5),
            (self.deactivate, 2),
            (self.generate, 4),
            (self.compose, 2),
            (self.split, 1),
            (self.delete, 2),
            (self.move, 3),
        ]
        calls, weights = zip(*operations, strict=True)
        while time.monotonic() < deadline:
            op = self.rng.choices(calls, weights)[0]
            started = time.perf_counter()
            try:
                op()
            except REFUSALS as e:
                self.log.errors[type(e).__name__] += 1
            except Exception as e:  # anything else is a failure of the system under test
                self.log.errors[type(e).__name__] += 1
                self.log.unexpected.append(f"{op.__name__}: {type(e).__name__}: {e}")
            self.log.latencies[op.__name__].append(time.perf_counter() - started)
        return self.log

    # -- operations -----------------------------------------------------------------------

    def load(self) -> None:
        self.made += 1
        text = document(self.rng, f"Client {self.index} document {self.made}")
        chunk = self.client.add_chunk(text)
        self._own(chunk, ("text", text))

    def activate(self) -> None:
        choices = [h for h in [*self.mine, *self.shared] if h not in self.active]
        if not choices:
            return
        chunk_hash = self.rng.choice(choices)
        tokens = self._active_tokens() + self._tokens(chunk_hash)
        if tokens > ACTIVE_TOKENS or len(self.active) >= ACTIVE_CHUNKS:
            return self.deactivate()
        self.client.activate_chunk(chunk_hash)
        self.active.append(chunk_hash)

    def deactivate(self) -> None:
        if self.active:
            chunk_hash = self.rng.choice(self.active)
            self.client.deactivate_chunk(chunk_hash)
            self.active.remove(chunk_hash)

    def generate(self) -> None:
        prompt = f"Client {self.index}: which {self.rng.choice(WORDS)} is named here?"
        active = [c.hash for c in self.client.context().chunks]
        result = self.client.generate(prompt, ANSWER)
        self.log.generations.append(Generation(self.mode, active, prompt, result.token_ids))
        for chunk in [result.prompt_chunk, *result.output_chunks]:
            self._own(chunk, None)

    def compose(self) -> None:
        # A view always reads one of this client's chunks, so no other client makes it too.
        own = [h for h, _ in self.recipes_of_mine()]
        if not own:
            return
        parts = [self.rng.choice(own), self.rng.choice([*own, *self.shared])]
        self.rng.shuffle(parts)
        view = self.client.compose_chunks(parts)
        self._own(view, ("compose", parts))

    def split(self) -> None:
        # Documents only: a half of a view could read only a shared document, and so be
        # another client's chunk too.
        own = [h for h, recipe in self.recipes_of_mine() if recipe[0] == "text"]
        if not own:
            return
        source = self.rng.choice(own)
        at = self.rng.randint(1, self.mine[source] - 1)
        for index, half in enumerate(self.client.split_chunk(source, at)):
            self._own(half, ("split", source, at, index))

    def delete(self) -> None:
        if not self.mine:
            return
        deleted = self.client.delete_chunk(
            self.rng.choice(list(self.mine)), self.rng.random() < 0.5
        )
        for chunk_hash in deleted:
            self.mine.pop(chunk_hash, None)
            if chunk_hash in self.active:
                self.active.remove(chunk_hash)

    def move(self) -> None:
        chunk_hash = self.rng.choice([*self.mine, *self.shared])
        move = self.rng.choice(
            [
                self.client.move_to_cpu,
                self.client.archive_to_disk,
                self.client.move_to_gpu,
                self.client.prefetch,
            ]
        )
        move(chunk_hash)

    # -- bookkeeping ----------------------------------------------------------------------

    def _own(self, chunk, recipe: tuple | None) -> None:
        self.mine[chunk.hash] = chunk.token_count
        if recipe is not None:
            self.recipes[chunk.hash] = recipe

    def recipes_of_mine(self) -> list[tuple[str, tuple]]:
        """This client's chunks that can be activated (documents and views, not answers)."""
        return [(h, self.recipes[h]) for h in self.mine if h in self.recipes]

    def _tokens(self, chunk_hash: str) -> int:
        return self.mine.get(chunk_hash) or self.shared[chunk_hash]

    def _active_tokens(self) -> int:
        return sum(self._tokens(h) for h in self.active)


@dataclass
class SoakReport:
    seconds: float
    clients: int
    operations: int
    latencies: dict[str, list[float]]
    errors: Counter
    unexpected: list[str]
    violations: list[str]
    lost: list[str]  # acknowledged chunks that are gone or do not load
    generations: int
    replay_mismatches: list[str]
    unreplayable: int  # generations that read a prompt or answer chunk deleted since

    def summary(self) -> dict:
        def ms(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 2)

        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "operations": self.operations,
            "ops_per_s": round(self.operations / self.seconds, 2),
            "latency_ms": {
                op: {"n": len(v), "p50": ms(v, 0.5), "p99": ms(v, 0.99)}
                for op, v in sorted(self.latencies.items())
            },
            "errors": dict(self.errors),
            "unexpected_errors": len(self.unexpected),
            "invariant_violations": len(self.violations),
            "lost_chunks": len(self.lost),
            "generations": self.generations,
            "replay_mismatches": len(self.replay_mismatches),
            "replayed": self.generations - self.unreplayable,
        }


def soak(first: Client, workers: list, clients: int, seconds: float) -> SoakReport:
    """Run `clients` SoakClients (contexts soak-0...) against the service `first` talks to,
    then check everything (see the module docstring)."""
    rng = random.Random(0)
    shared = {}
    for i in range(3):
        chunk = first.add_chunk(document(rng, f"Shared document {i}"))
        shared[chunk.hash] = chunk.token_count
    recipes: dict = {}
    soakers = [
        SoakClient(first.with_context(f"soak-{i}"), i, shared, recipes) for i in range(clients)
    ]
    logs: list[Worklog] = []
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    threads = [
        threading.Thread(target=lambda s=s: logs.append(s.run(deadline)), name=f"soak-{s.index}")
        for s in soakers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    violations = sorted({line for w in workers for line in ray.get(w.violations.remote())})
    for s in soakers:
        s.client.clear()  # what was active stays in the pool: room for the checks below
    lost = _lost(first, {h: n for s in soakers for h, n in s.mine.items()} | shared)
    generations = [g for log in logs for g in log.generations]
    mismatches, unreplayable = _replay(first.with_context("soak-replay"), generations, recipes)
    latencies: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        for op, values in log.latencies.items():
            latencies[op] += values
    return SoakReport(
        seconds=elapsed,
        clients=clients,
        operations=sum(len(v) for v in latencies.values()),
        latencies=dict(latencies),
        errors=sum((log.errors for log in logs), Counter()),
        unexpected=[line for log in logs for line in log.unexpected],
        violations=violations,
        lost=lost,
        generations=len(generations),
        replay_mismatches=mismatches,
        unreplayable=unreplayable,
    )


def _lost(client: Client, acknowledged: dict[str, int]) -> list[str]:
    """Acknowledged chunks that are gone, changed, or whose KV does not load."""
    lost = []
    for chunk_hash, tokens in acknowledged.items():
        try:
            chunk = client.get_chunk(chunk_hash)
            client.populate(chunk_hash)
            client.archive_to_disk(chunk_hash)  # leave the pool as it was: empty of it
        except ChunkNotFound:
            lost.append(f"{chunk_hash[:12]}: gone")
            continue
        if chunk.token_count != tokens:
            lost.append(f"{chunk_hash[:12]}: {chunk.token_count} tokens, was {tokens}")
    return lost


class Unreplayable(Exception):
    """A generation attended to an answer or prompt chunk that was deleted since."""


def _replay(client: Client, generations: list[Generation], recipes: dict) -> tuple[list[str], int]:
    """Each generation again, alone: the same chunks, order, mode and prompt. Returns the
    mismatches and how many generations could not be replayed (see Unreplayable)."""
    mismatches, unreplayable = [], 0
    for g in generations:
        client.configure(mode=g.mode)
        client.clear()
        try:
            active = [_remade(client, chunk_hash, recipes) for chunk_hash in g.active]
        except Unreplayable:
            unreplayable += 1
            continue
        for chunk_hash in active:
            client.activate_chunk(chunk_hash)
        again = client.generate(g.prompt, ANSWER).token_ids
        if again != g.token_ids:
            mismatches.append(f"{g.prompt!r} in {g.mode}: {g.token_ids} then {again}")
    client.clear()
    return mismatches, unreplayable


def _remade(client: Client, chunk_hash: str, recipes: dict) -> str:
    """The chunk, made again from its recipe if its client deleted it after the answer."""
    try:
        return client.get_chunk(chunk_hash).hash
    except ChunkNotFound:
        pass
    if chunk_hash not in recipes:  # an answer or a prompt: only its generation made it
        raise Unreplayable(chunk_hash)
    kind, *args = recipes[chunk_hash]
    if kind == "text":
        made = client.add_chunk(args[0])
    elif kind == "compose":
        made = client.compose_chunks([_remade(client, h, recipes) for h in args[0]])
    else:
        source, at, index = args
        made = client.split_chunk(_remade(client, source, recipes), at)[index]
    assert made.hash == chunk_hash, f"{kind} made {made.hash[:12]}, not {chunk_hash[:12]}"
    return made.hash


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="each worker's KV pool")
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    running = service.start(
        args.workers,
        model=resolve_model(None),
        home=tempfile.mkdtemp(prefix="kvchunks-soak-"),
        engine_options={"kv_cache_bytes": args.kv_cache_mb << 20},
        detached=False,
    )
    try:
        report = soak(
            connect("auto", "soak"), list(running.workers.values()), args.clients, args.seconds
        )
    finally:
        service.stop()
        ray.shutdown()
    for line in [*report.unexpected, *report.violations, *report.lost, *report.replay_mismatches]:
        print(line)
    print(json.dumps({"bench": "soak", "workers": args.workers, **report.summary()}))


if __name__ == "__main__":
    main()
