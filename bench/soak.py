"""Many clients against one service at once, then proof that nothing went wrong.

Each client works in its own context over the shared pool for --seconds: it loads documents,
activates and deactivates them (and a few documents every client shares, and its own prompts
and answers), composes and splits them, generates, deletes what it made, and moves chunks
between tiers. Only calls that were made count as operations (a step with nothing to act
on makes none). Afterwards:

- every worker's invariants hold (ChunkStore.violations: reference counts, loadable active
  chunks, pool blocks owned exactly once, no dangling provenance);
- everything is made again, one call at a time, by a ContextManager in a fresh data
  directory: documents from their text, views from their sources, prompts and answers by
  asking again with the same chunks active in the same order and mode. Every answer must
  equal its concurrent original, token for token, with the same chunk hashes;
- every chunk a client was told it has, and did not delete, is there with its tokens, and
  its KV (exported from the service) is bitwise the KV of that fresh recompute.

Errors are counted by type; only the documented refusals (below) are expected. Prints one
JSON object last, with `ops_per_s`, latency percentiles per operation and
`invariant_violations`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from kvchunks.actors import service
from kvchunks.actors.client import Client, connect
from kvchunks.actors.remote import NAMESPACE
from kvchunks.bench import scratch_dir
from kvchunks.common import (
    CapacityError,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    ContextWindowExceeded,
)
from kvchunks.engine import EngineConfig, SamplingParams
from kvchunks.engine.checkpoint import resolve_model
from kvchunks.service.context_manager import ContextManager
from kvchunks.store.kv_file import read_kv_file

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
    made: list[str]  # the prompt chunk and the output chunks, in that order


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
        self.call_made: str | None = None  # the API call the current step made, if any
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
        steps, weights = zip(*operations, strict=True)
        while time.monotonic() < deadline:
            step = self.rng.choices(steps, weights)[0]
            self.call_made = None
            started = time.perf_counter()
            try:
                step()
            except REFUSALS as e:
                self.log.errors[type(e).__name__] += 1
            except Exception as e:  # anything else is a failure of the system under test
                self.log.errors[type(e).__name__] += 1
                self.log.unexpected.append(f"{step.__name__}: {type(e).__name__}: {e}")
            if self.call_made is not None:  # a step with nothing to act on is no operation
                self.log.latencies[self.call_made].append(time.perf_counter() - started)
        return self.log

    def call(self, operation: str, method, *args):
        """Make the step's one API call, named for the operation counts and latencies."""
        self.call_made = operation
        return method(*args)

    # -- operations -----------------------------------------------------------------------

    def load(self) -> None:
        self.made += 1
        text = document(self.rng, f"Client {self.index} document {self.made}")
        chunk = self.call("load", self.client.add_chunk, text)
        self._own(chunk, ("text", text))

    def activate(self) -> None:
        choices = [h for h in [*self.mine, *self.shared] if h not in self.active]
        if not choices:
            return
        chunk_hash = self.rng.choice(choices)
        tokens = self._active_tokens() + self._tokens(chunk_hash)
        if tokens > ACTIVE_TOKENS or len(self.active) >= ACTIVE_CHUNKS:
            return self.deactivate()
        self.call("activate", self.client.activate_chunk, chunk_hash)
        self.active.append(chunk_hash)

    def deactivate(self) -> None:
        if self.active:
            chunk_hash = self.rng.choice(self.active)
            self.call("deactivate", self.client.deactivate_chunk, chunk_hash)
            self.active.remove(chunk_hash)

    def generate(self) -> None:
        prompt = f"Client {self.index}: which {self.rng.choice(WORDS)} is named here?"
        active = list(self.active)
        result = self.call("generate", self.client.generate, prompt, ANSWER)
        made = [result.prompt_chunk, *result.output_chunks]
        g = Generation(self.mode, active, prompt, result.token_ids, [c.hash for c in made])
        self.log.generations.append(g)
        for chunk in made:
            self._own(chunk, ("generation", g))

    def compose(self) -> None:
        # A view always reads one of this client's chunks, so no other client makes it too.
        own = [h for h, _ in self.activatable()]
        if not own:
            return
        parts = [self.rng.choice(own), self.rng.choice([*own, *self.shared])]
        self.rng.shuffle(parts)
        view = self.call("compose", self.client.compose_chunks, parts)
        self._own(view, ("compose", parts))

    def split(self) -> None:
        # Documents only: a half of a view could read only a shared document, and so be
        # another client's chunk too.
        own = [h for h, recipe in self.activatable() if recipe[0] == "text"]
        if not own:
            return
        source = self.rng.choice(own)
        at = self.rng.randint(1, self.mine[source] - 1)
        for index, half in enumerate(self.call("split", self.client.split_chunk, source, at)):
            self._own(half, ("split", source, at, index))

    def delete(self) -> None:
        if not self.mine:
            return
        chunk_hash, cascade = self.rng.choice(list(self.mine)), self.rng.random() < 0.5
        for deleted in self.call("delete", self.client.delete_chunk, chunk_hash, cascade):
            self.mine.pop(deleted, None)
            if deleted in self.active:
                self.active.remove(deleted)

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
        self.call("move", move, chunk_hash)

    # -- bookkeeping ----------------------------------------------------------------------

    def _own(self, chunk, recipe: tuple) -> None:
        self.mine[chunk.hash] = chunk.token_count
        self.recipes.setdefault(chunk.hash, recipe)  # the first call that made it

    def activatable(self) -> list[tuple[str, tuple]]:
        """This client's documents and views (not its prompts and answers), with recipes."""
        return [(h, self.recipes[h]) for h in self.mine if self.recipes[h][0] != "generation"]

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
    lost: list[str]  # acknowledged chunks that are gone, changed, or unlike their recompute
    checked_kv: int  # chunks whose KV was compared with the fresh recompute
    generations: int
    replay_mismatches: list[str]

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
            "kv_checked": self.checked_kv,
            "generations": self.generations,
            "replay_mismatches": len(self.replay_mismatches),
        }


def soak(
    first: Client, workers: list, clients: int, seconds: float, engine: EngineConfig
) -> SoakReport:
    """Run `clients` SoakClients (contexts soak-0...) against the service `first` talks to,
    then check everything (see the module docstring); the replay runs on `engine`'s config,
    which must give the workers' model fingerprint (dtype, block size)."""
    rng = random.Random(0)
    shared, recipes = {}, {}
    for i in range(3):
        text = document(rng, f"Shared document {i}")
        chunk = first.add_chunk(text)
        shared[chunk.hash], recipes[chunk.hash] = chunk.token_count, ("text", text)
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
    generations = [g for log in logs for g in log.generations]
    acknowledged = {h for s in soakers for h in s.mine} | set(shared)
    home = scratch_dir("soak-replay")
    with ContextManager(home=home, engine_config=engine) as cm, threads_of(workers):
        replay = Replay(cm, recipes)
        for g in generations:
            replay.generation(g)
        lost, checked = _lost(first, replay, acknowledged)
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
        checked_kv=checked,
        generations=len(generations),
        replay_mismatches=replay.mismatches,
    )


@contextlib.contextmanager
def threads_of(workers: list) -> Iterator[None]:
    """Compute with as many threads as the workers do: a matrix product split over another
    number of threads may round differently, and the KV is compared bit for bit."""
    (threads,) = {ray.get(w.status.remote())["threads"] for w in workers}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Diverged(Exception):
    """The replay did not make a chunk the concurrent run made (its answer differed)."""


class Replay:
    """Every chunk made again, one call at a time, by a ContextManager of its own (a fresh
    data directory: nothing computed during the concurrent run is read): documents from their
    text, views from their sources, prompts and answers by asking again."""

    def __init__(self, cm: ContextManager, recipes: dict):
        self.cm, self.recipes = cm.with_context("replay"), recipes
        self.replayed: set[int] = set()  # ids of the generations asked again
        self.mismatches: list[str] = []

    def chunk(self, chunk_hash: str) -> None:
        """Make the chunk here (and what it is made from) unless it is already here."""
        try:
            self.cm.get_chunk(chunk_hash)
            return
        except ChunkNotFound:
            pass
        kind, *args = self.recipes[chunk_hash]
        if kind == "generation":
            self.generation(args[0])
            self.cm.get_chunk(chunk_hash)  # made by asking again, unless the answer differed
            return
        if kind == "text":
            made = self.cm.add_chunk(args[0])
        elif kind == "compose":
            for part in args[0]:
                self.chunk(part)
            made = self.cm.compose_chunks(args[0])
        else:
            source, at, index = args
            self.chunk(source)
            made = self.cm.split_chunk(source, at)[index]
        if made.hash != chunk_hash:
            raise Diverged(f"{kind} made {made.hash[:12]}, not {chunk_hash[:12]}")

    def generation(self, g: Generation) -> None:
        """Ask again with the same chunks active, in order, in the same mode; a different
        answer, or different chunks made, is a mismatch."""
        if id(g) in self.replayed:
            return
        self.replayed.add(id(g))
        try:
            for chunk_hash in g.active:
                self.chunk(chunk_hash)
        except (Diverged, ChunkNotFound) as e:
            self.mismatches.append(f"{g.prompt!r}: its chunks could not be made again: {e}")
            return
        self.cm.clear()
        for chunk_hash in g.active:
            self.cm.activate_chunk(chunk_hash)
        again = self.cm.generate(g.prompt, ANSWER, g.mode)
        made = [c.hash for c in [again.prompt_chunk, *again.output_chunks]]
        if (again.token_ids, made) != (g.token_ids, g.made):
            self.mismatches.append(
                f"{g.prompt!r} in {g.mode}: {g.token_ids} then {again.token_ids}"
            )


def _lost(client: Client, replay: Replay, acknowledged: set[str]) -> tuple[list[str], int]:
    """Acknowledged chunks that are gone, or whose tokens or KV differ from the replay's
    recompute; and how many chunks' KV was compared."""
    lost, checked, folder = [], 0, scratch_dir("soak-kv")
    for chunk_hash in sorted(acknowledged):
        try:
            chunk = client.get_chunk(chunk_hash)
        except ChunkNotFound:
            lost.append(f"{chunk_hash[:12]}: gone")
            continue
        try:
            replay.chunk(chunk_hash)
        except (Diverged, ChunkNotFound) as e:
            lost.append(f"{chunk_hash[:12]}: not made again ({e})")
            continue
        again = replay.cm.get_chunk(chunk_hash)
        if chunk.token_ids != again.token_ids:
            lost.append(f"{chunk_hash[:12]}: tokens changed")
        elif chunk.layout != "view":  # a view's KV is its sources'
            checked += 1
            served = client.export_chunk(chunk_hash, folder / f"served-{chunk_hash}.kvc")
            client.archive_to_disk(chunk_hash)  # leave the pool as it was: empty of it
            recomputed = replay.cm.export_chunk(chunk_hash, folder / f"again-{chunk_hash}.kvc")
            if not _same_kv(served, recomputed):
                lost.append(f"{chunk_hash[:12]}: KV differs from its recompute")
    return lost, checked


def _same_kv(a: Path, b: Path) -> bool:
    """Bitwise: -0.0 is not 0.0, and a NaN equals only the same NaN."""
    ka, va, _, _ = read_kv_file(a)
    kb, vb, _, _ = read_kv_file(b)
    return all(
        x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in ((ka, kb), (va, vb))
    )


SMOKE = {"clients": 2, "seconds": 5.0, "workers": 1, "kv_cache_mb": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="each worker's KV pool")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    ray.init("local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    engine = {"kv_cache_bytes": args.kv_cache_mb << 20}
    running = service.start(
        args.workers,
        model=resolve_model(None),
        home=scratch_dir("soak"),
        engine_options=engine,
        detached=False,
    )
    try:
        workers = list(running.workers.values())
        first = connect("auto", "soak")
        report = soak(first, workers, args.clients, args.seconds, EngineConfig(**engine))
    finally:
        service.stop()
        ray.shutdown()
    for line in [*report.unexpected, *report.violations, *report.lost, *report.replay_mismatches]:
        print(line)
    print(json.dumps({"bench": "soak", "workers": args.workers, **report.summary()}))


if __name__ == "__main__":
    main()
