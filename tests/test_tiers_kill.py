"""A process killed in the middle of archive_to_disk: after a restart the chunk is intact,
in exactly the one tier the registry records, and no partial file is left."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
from reference import bits

from kvchunks.store.kv_file import kv_path, read_kv_file

DOC = "The secret code of the vault is 4817. The vault is hidden under the old mill in Zurich."

# Makes a chunk, saves its KV as the reference, then archives it and is SIGKILLed at `point`:
#   writing    the chunk's file was lost, the new one is written but not yet renamed
#   recording  the call returned, the tier is not yet recorded
#   recorded   the tier "disk" is recorded, the records are not yet flushed
CHILD = """
import os, signal, sys
import safetensors.torch
from kvchunks.service.context_manager import ContextManager
from kvchunks.engine import EngineConfig
from kvchunks.store import kv_file
from kvchunks.store.registry import ChunkRegistry

model, home, point, reference, text = sys.argv[1:6]
cm = ContextManager(model, home=home, engine_config=EngineConfig(kv_cache_bytes=64 << 20))
store = cm.store
chunk = cm.add_chunk(text)
k, v = store.model.llm.read_kv(store.composer.segments(chunk))
safetensors.torch.save_file({"k": k, "v": v}, reference)
print(chunk.hash, flush=True)
store.tiers.records.flush()

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

set_tiers = ChunkRegistry.set_tiers
if point == "writing":
    kv_file.kv_path(store.home, chunk.hash).unlink()
    kv_file.os.replace = die
elif point == "recording":
    ChunkRegistry.set_tiers = die
else:
    ChunkRegistry.set_tiers = lambda self, *a: (set_tiers(self, *a), die())
cm.archive_to_disk(chunk.hash)
store.tiers.records.flush()
print("archived: not killed", flush=True)
"""


@pytest.mark.parametrize(
    "point, tier", [("writing", "gpu"), ("recording", "gpu"), ("recorded", "disk")]
)
def test_kill_during_archive_leaves_the_chunk_intact_in_one_tier(
    point, tier, model_path, make_cm, tmp_path
):
    home, reference = tmp_path / "home", tmp_path / "reference.safetensors"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_path), str(home), point, str(reference), DOC],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stdout + child.stderr[-3000:]
    chunk_hash = child.stdout.split()[0]
    partial = list((home / "kv").rglob(".*.tmp"))
    assert len(partial) == (point == "writing")

    cm = make_cm(at=home)  # the restart
    store = cm.store
    assert cm.get_chunk(chunk_hash).tier == tier
    assert (chunk_hash in store.tiers.kv) == (tier == "gpu") and chunk_hash not in store.host
    assert not list((home / "kv").rglob(".*.tmp"))
    k, v, _, _ = read_kv_file(kv_path(home, chunk_hash), store.model.fingerprint)  # sound file
    in_pool = store.model.llm.read_kv(store.composer.segments(cm.registry.get(chunk_hash)))
    expected = safetensors.torch.load_file(reference)
    for got in ((k, v), in_pool):
        assert all(bits(a) == bits(expected[n]) for a, n in zip(got, "kv", strict=True))
    assert store.violations() == []
