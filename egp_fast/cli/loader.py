"""Epoch-seeded, rank-sharded loaders over the splits of a :class:`~egp_fast.cli.data.DataSource`.

:func:`make_loader` builds a :class:`Loader` over one split for one rank; its order comes from an
:class:`EpochSampler`. Shuffling is derived from ``(seed, epoch)`` only, so a resumed epoch sees
exactly the same batches, and evaluation/measurement shards are disjoint without padding, so
counts summed over ranks equal the one-process counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from egp_fast.cli.data import TensorDataset
from egp_fast.errors import ConfigError

__all__ = ["EpochSampler", "Loader", "make_loader"]


class EpochSampler(torch.utils.data.Sampler):
    """Indices for one rank, reshuffled from ``(seed, epoch)`` alone.

    Shuffled training order: ``randperm(n)`` from a generator seeded with ``seed + epoch``,
    padded by wrapping around to a multiple of ``world_size`` (so every rank runs the same
    number of steps, as DDP requires), then ``rank::world_size``. Unshuffled evaluation order:
    ``rank::world_size`` of ``range(n)`` with no padding, so the shards are disjoint and cover
    every sample exactly once.

    Args:
        n: dataset length.
        shuffle: training order (True) or evaluation order (False).
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.

    Example:
        >>> s = EpochSampler(5, shuffle=False, rank=1, world_size=2)
        >>> list(s)
        [1, 3]
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size, self.epoch = int(rank), int(world_size), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses.

        Args:
            epoch: epoch index (any integer).

        Example:
            >>> s = EpochSampler(4, shuffle=True); s.set_epoch(3)
        """
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch.

        Returns:
            A list of dataset indices.

        Example:
            >>> EpochSampler(3, shuffle=False).indices()
            [0, 1, 2]
        """
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world_size))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world_size) * self.world_size
        order += order[: total - self.n]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.n, self.world_size))
        return math.ceil(self.n / self.world_size)


class Loader:
    """Batches ``(x, y)`` of one split for one rank, moved to ``device``.

    In-memory :class:`TensorDataset` splits are sliced directly (no per-sample collation,
    which dominates the time of a small-image run); other datasets go through a
    ``torch.utils.data.DataLoader`` with workers and pinned memory, whose worker seeds are also
    derived from ``(seed, epoch)``.

    Args:
        dataset: a :class:`TensorDataset` or any map-style dataset of ``(image, label)``.
        batch_size: samples per batch on this rank.
        sampler: the :class:`EpochSampler` giving the order.
        drop_last: drop a final partial batch (training; BatchNorm needs > 1 sample).
        device: where batches are moved.
        workers: DataLoader worker processes (ignored for in-memory data).
        channels_last: move image batches to channels-last memory format.

    Example:
        >>> from egp_fast.cli.data import load_data
        >>> src = load_data("digits", limit=10)
        >>> ld = make_loader(src.test, batch_size=4)
        >>> [x.shape[0] for x, y in ld]
        [4, 4, 2]
    """

    def __init__(self, dataset, batch_size: int, sampler: EpochSampler, *, drop_last: bool = False,
                 device: torch.device | str = "cpu", workers: int = 0, channels_last: bool = False):
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler
        self.drop_last, self.device = drop_last, torch.device(device)
        self.channels_last = channels_last
        self._dl = None
        if not isinstance(dataset, TensorDataset):
            self._generator = torch.Generator()
            self._dl = torch.utils.data.DataLoader(
                dataset, batch_size=self.batch_size, sampler=sampler, num_workers=int(workers),
                pin_memory=self.device.type == "cuda", drop_last=drop_last, generator=self._generator,
                persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (and reseed the workers' augmentation RNG).

        Args:
            epoch: epoch index.

        Example:
            >>> from egp_fast.cli.data import load_data
            >>> ld = make_loader(load_data("digits", limit=8).train, 4, shuffle=True); ld.set_epoch(2)
        """
        self.sampler.set_epoch(epoch)
        if self._dl is not None:
            self._generator.manual_seed(self.sampler.seed * 1000003 + int(epoch))

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _move(self, x: torch.Tensor, y: torch.Tensor):
        nb = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=nb)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=nb)

    def __iter__(self):
        if self._dl is not None:
            for x, y in self._dl:
                yield self._move(x, y)
            return
        idx = torch.tensor(self.sampler.indices(), dtype=torch.int64)
        stop = len(self) * self.batch_size
        for start in range(0, stop, self.batch_size):
            sl = idx[start:min(start + self.batch_size, idx.numel())]
            yield self._move(self.dataset.x[sl], self.dataset.y[sl])


def make_loader(dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, rank: int = 0,
                world_size: int = 1, workers: int = 0, device: torch.device | str = "cpu",
                drop_last: bool | None = None, channels_last: bool = False) -> Loader:
    """Build a :class:`Loader` over ``dataset`` for one rank.

    Args:
        dataset: a split of a :class:`DataSource`.
        batch_size: samples per batch on this rank (positive).
        shuffle: training order (epoch-seeded shuffle, padded shards) or evaluation order
            (fixed, disjoint shards).
        seed: base seed of the shuffle.
        rank: this process's rank.
        world_size: number of processes.
        workers: DataLoader workers for on-disk datasets.
        device: where batches go.
        drop_last: default: True when shuffling and the shard has more than one batch.
        channels_last: move batches to channels-last memory format.

    Returns:
        The loader; call ``set_epoch(e)`` before each training epoch.

    Raises:
        ConfigError: non-positive batch size.

    Example:
        >>> from egp_fast.cli.data import load_data
        >>> ld = make_loader(load_data("digits").train, 64, shuffle=True, seed=0)
        >>> ld.set_epoch(0); x, y = next(iter(ld)); x.shape
        torch.Size([64, 1, 16, 16])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    if drop_last is None:
        drop_last = shuffle and len(sampler) > batch_size
    return Loader(dataset, batch_size, sampler, drop_last=drop_last, device=device, workers=workers,
                  channels_last=channels_last)
