"""How much each tier may hold."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvchunks.common import InvalidInput


@dataclass(frozen=True)
class TierBudgets:
    gpu_blocks: int | None = None  # None: the whole KV pool
    cpu_bytes: int = 4 << 30
    disk_bytes: int | None = None  # None: as much as the disk has
    disk_compression: str = "none"  # or "bf16": half the bytes, declared in each file

    def __post_init__(self) -> None:
        if self.gpu_blocks is not None and self.gpu_blocks < 1:
            raise InvalidInput(
                f"the gpu budget (KVCHUNKS_GPU_BLOCKS) must be at least 1 block, not "
                f"{self.gpu_blocks}; unset, it is the whole pool"
            )

    @classmethod
    def from_env(cls) -> TierBudgets:
        """KVCHUNKS_GPU_BLOCKS, KVCHUNKS_CPU_BYTES and KVCHUNKS_DISK_BYTES, where set."""
        values = {}
        for name in ("gpu_blocks", "cpu_bytes", "disk_bytes"):
            raw = os.environ.get(f"KVCHUNKS_{name.upper()}")
            if raw is None:
                continue
            if not (raw.isascii() and raw.isdigit()):  # not "²", which int() refuses
                raise InvalidInput(f"KVCHUNKS_{name.upper()} must be a whole number, not {raw!r}")
            values[name] = int(raw)
        compression = os.environ.get("KVCHUNKS_DISK_COMPRESSION", "none")
        if compression not in ("none", "bf16"):
            raise InvalidInput(
                f"KVCHUNKS_DISK_COMPRESSION must be none or bf16, not {compression!r}"
            )
        return cls(**values, disk_compression=compression)
