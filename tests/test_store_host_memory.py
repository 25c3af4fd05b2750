"""Host memory buffers: reused only once no tensor uses them, within the tier's budget."""

from __future__ import annotations

import torch

from kvchunks.store.host_memory import HostMemory

MIB = 1 << 20


def fill(buffer: torch.Tensor, value: int) -> torch.Tensor:
    return buffer.fill_(value)


def test_a_buffer_is_reused_only_when_no_tensor_uses_it():
    host = HostMemory(budget_bytes=64 * MIB)
    first = fill(host.buffer(3 * MIB), 1)
    k, v = first.view(torch.float32).view(2, -1)  # views keep the memory in use
    address = first.data_ptr()
    del first
    second = fill(host.buffer(3 * MIB), 2)
    assert second.data_ptr() != address
    assert bool((k.view(torch.uint8) == 1).all()) and bool((v.view(torch.uint8) == 1).all())
    del k, v
    third = host.buffer(3 * MIB)
    assert third.data_ptr() == address  # spare now: handed out again, not new memory
    assert third.data_ptr() != second.data_ptr() and bool((second == 2).all())


def test_chunks_in_the_tier_keep_their_bytes_while_buffers_come_and_go():
    host = HostMemory(budget_bytes=256 * MIB)
    kept = {}
    for i in range(20):
        k, v = fill(host.buffer(2 * MIB), i).view(torch.float32).view(2, -1)
        host.put(f"chunk{i}", k, v)
        kept[f"chunk{i}"] = i
        if i % 3 == 0:  # some leave the tier again: their buffers become spare
            host.pop(f"chunk{i // 2}")
            kept.pop(f"chunk{i // 2}", None)
    for name, value in kept.items():
        assert all(bool((t.view(torch.uint8) == value).all()) for t in host.kv[name]), name


def test_spare_buffers_are_a_close_fit_and_stay_within_the_budget():
    host = HostMemory(budget_bytes=32 * MIB)
    big = host.buffer(20 * MIB)
    big_address = big.data_ptr()
    del big
    small = host.buffer(3 * MIB)  # the spare 20 MiB one would waste most of itself
    assert small.data_ptr() != big_address
    del small
    assert sorted(len(b) for b in host._buffers) == [3 * MIB, 20 * MIB]
    # 20 MiB spare + 3 MiB spare + 12 MiB new would pass the 32 MiB budget: the oldest goes.
    new = host.buffer(12 * MIB)
    assert new.data_ptr() != big_address
    assert sorted(len(b) for b in host._buffers) == [3 * MIB, 12 * MIB]


def test_buffer_sizes():
    host = HostMemory(budget_bytes=64 * MIB)
    assert host.buffer(0).numel() == 0
    small = host.buffer(100)  # from the ordinary allocator: not kept
    assert small.dtype == torch.uint8 and small.numel() == 100 and not host._buffers
    odd = host.buffer(MIB + 1)  # rounded up by at most an eighth
    assert odd.numel() == MIB + 1 and [len(b) for b in host._buffers] == [MIB + MIB // 8]
