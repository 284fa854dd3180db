"""Where work runs: the device, this process's rank among the DDP processes, and rank 0's writers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Env:
    """Where a stage runs: device, process rank, and the rank-0-only writers."""

    device: torch.device
    out_dir: Path
    rank: int = 0
    world_size: int = 1
    writer: object | None = None  # torch.utils.tensorboard.SummaryWriter on rank 0
    # gloo group with a long timeout, where ranks wait while rank 0 runs a stage alone (exports, benchmarks):
    # the training group's timeout (NCCL: 10 minutes) must not bound a stage's length
    wait_group: object | None = None
    # the command line that started this process, recorded with what a run measures (None: this process's argv)
    command: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"
