"""KV copied between the paged pool and plain tensors: out of the pool for the cpu tier and
chunk files, into new blocks when it comes back. One copy per run of adjacent slots, not a
gather per token. On CUDA, copies between the pool and host memory run on a stream of their
own, so that they overlap the compute stream's work.

`pool` here is the flat view [2, layers, slots, kv_heads, head_dim]; `out`, `k` and `v` hold
tokens in order: [2, layers, tokens, ...] and [layers, tokens, ...].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from kvchunks.engine.kv_segment import KVSegment


class CopyStream:
    """The stream for copies between a GPU pool and host memory, made on first use; one per
    engine, so that its copies keep their order."""

    def __init__(self, device: torch.device):
        self.device = device
        # Made now, not on first use: two threads' first copies would each make one, and
        # copies on one stream keep their order.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def running(self) -> Iterator[torch.cuda.Stream]:
        """Run the block's work on the copy stream. It first waits for the compute stream's
        work so far (its writes of the pool, its reads of blocks freed since), and the
        compute stream's work from then on waits for the copies (reads of blocks just
        written)."""
        stream, compute = self.stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(compute)
        try:
            with torch.cuda.stream(stream):
                yield stream
        finally:  # also after a failed copy: what it queued may still be running
            compute.wait_stream(stream)


def gather(
    pool: torch.Tensor, segments: Seq[KVSegment], block_size: int, out: torch.Tensor
) -> None:
    """The segments' KV into `out`, on the pool's device."""
    offset = 0
    for segment in segments:
        for first, count in segment.slot_runs(block_size):
            out[:, :, offset : offset + count] = pool[:, :, first : first + count]
            offset += count


def gather_to_host(
    pool: torch.Tensor,
    segments: Seq[KVSegment],
    block_size: int,
    out: torch.Tensor,
    copies: CopyStream,
) -> None:
    """`gather` into host memory. From a GPU pool the runs are gathered on the device, then
    cross in one copy on the copy stream; the calling thread waits for that copy alone, so
    other threads' compute goes on meanwhile."""
    if not pool.is_cuda:
        gather(pool, segments, block_size, out)
        return
    with copies.running() as stream:
        gathered = torch.empty(out.shape, dtype=out.dtype, device=pool.device)
        gather(pool, segments, block_size, gathered)
        out.copy_(gathered, non_blocking=True)
        copied = stream.record_event()
    copied.synchronize()  # out is read as soon as this returns


def scatter(
    pool: torch.Tensor,
    segment: KVSegment,
    block_size: int,
    k: torch.Tensor,
    v: torch.Tensor,
    copies: CopyStream,
) -> None:
    """K and V into the segment's slots. From host memory to a GPU pool the copy runs on the
    copy stream, and the compute stream waits for it before its next work."""
    from_host = pool.is_cuda and not k.is_cuda
    with copies.running() if from_host else contextlib.nullcontext():
        # Pinned host memory comes from torch's caching host allocator, which keeps it from
        # reuse until the copy is done; pageable memory is staged before the call returns.
        # Either way k and v may go as soon as this returns.
        k, v = k.to(pool.device, non_blocking=True), v.to(pool.device, non_blocking=True)
        offset = 0
        for first, count in segment.slot_runs(block_size):
            pool[0, :, first : first + count] = k[:, offset : offset + count]
            pool[1, :, first : first + count] = v[:, offset : offset + count]
            offset += count
