"""Which samples a rank draws in an epoch, with the epoch carried in every index.

A training sample is a pure function of ``(seed, epoch, index)`` (``TrainDataset``). Loader worker processes
hold their own copy of the dataset, and persistent workers keep it for the whole run, so an epoch set on the
main process's dataset never reaches them. The sampler runs in the main process, though: it yields
``(epoch, index)`` pairs, and every worker count (0, 1 or 4) then draws exactly the same samples for an epoch,
new ones each epoch.

Ranks take interleaved indices (rank r: r, r + world, ...), as ``DistributedSampler`` without shuffling does.
Shuffling would add nothing: which case, class, crop and prompts sample ``index`` shows is already random.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    def __init__(self, size: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.size, self.rank, self.world = size, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world  # every rank the same number of steps (the remainder is dropped)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in range(self.rank, len(self) * self.world, self.world):
            yield self.epoch, index
