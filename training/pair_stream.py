"""An endless, resumable stream of pair batches: pairs redrawn every pass, sharded over processes."""
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.augment import AugmentSettings, PairBytesDataset, augment_batch, collate_pair_bytes
from datasets.image_lists import Sample
from datasets.pairs import PairDataset, make_pairs, pass_rng


class SeededItems(Dataset):
    """Seeds torch's RNG from (seed, pass, index) before each item.

    The random augmentations of a pair then depend only on which pair it is, not on the number of
    DataLoader workers or on where a run was resumed: this is what makes resume exact.
    """

    def __init__(self, dataset: Dataset, seed: int, pass_index: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.pass_index = pass_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item_seed = np.random.SeedSequence([self.seed, self.pass_index, index]).generate_state(1)[0]
        torch.manual_seed(int(item_seed))
        return self.dataset[index]


class ShardBatches(Sampler):
    """This process's batches of one pass, from batch `skip_batches` on, as lists of pair indices.

    The order is exactly that of `DistributedSampler(shuffle=True, drop_last=True, seed)` at epoch
    `pass_index` cut into batches of `batch_size` (incomplete last batch dropped), which earlier
    runs used, so their checkpoints resume to the same pairs. But the shuffled order is kept as one
    tensor and each batch sliced from this process's strided view of it: at ImageNet scale (27.3M
    pairs per pass) no 27.3M-element Python list is built on every rank at every pass start.
    """

    def __init__(self, n_items: int, world_size: int, rank: int, seed: int, pass_index: int,
                 batch_size: int, skip_batches: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.n_items = n_items
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.pass_index = pass_index
        self.batch_size = batch_size
        # DistributedSampler's drop_last share: the largest multiple of the world size.
        self.per_rank = n_items // world_size
        self.n_batches = self.per_rank // batch_size
        self.skip_batches = min(skip_batches, self.n_batches)

    def shard(self) -> torch.Tensor:
        """This process's pair indices for the whole pass, in order (a strided view of one permutation)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.pass_index)
        order = torch.randperm(self.n_items, generator=generator)
        return order[:self.per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        shard = self.shard()
        for batch in range(self.skip_batches, self.n_batches):
            yield shard[batch * self.batch_size:(batch + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.n_batches - self.skip_batches


class PairStream:
    """Pair batches for one process, pass after pass, starting at any global micro-step."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, neg_to_pos_ratio: int,
                 class_balancing: bool, batch_size: int, num_workers: int, seed: int, rank: int,
                 world_size: int, pin_memory: bool,
                 device_augment: Optional[Tuple[AugmentSettings, torch.device]] = None,
                 load_truncated: bool = False) -> None:
        """`device_augment` (settings, device): workers read bytes and draw parameters, the batch is decoded
        and augmented on the device (the same parameters as `transform` would draw per image).
        `load_truncated` (--load_truncated_images) goes to every pass's dataset, and with it to the workers."""
        self.samples: List[Sample] = list(samples)
        self.labels = np.fromiter((label for _, label in self.samples), dtype=np.int64,
                                  count=len(self.samples))
        self.transform = transform
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.class_balancing = class_balancing
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.device_augment = device_augment
        self.load_truncated = load_truncated
        # The number of pairs per pass does not depend on the draw, so it is known up front.
        n_classes = len(np.unique(self.labels))
        if class_balancing:
            anchors = n_classes * int(np.bincount(np.unique(self.labels, return_inverse=True)[1]).max())
        else:
            anchors = len(self.labels)
        self.pairs_per_pass = anchors * (1 + neg_to_pos_ratio)
        self.batches_per_pass = (self.pairs_per_pass // world_size) // batch_size
        if self.batches_per_pass == 0:
            raise ValueError(
                f"--batch_size {batch_size} x {world_size} process(es) is larger than one pass over the "
                f"data ({self.pairs_per_pass} pairs): lower --batch_size or add data")

    def _loader(self, pass_index: int, skip_batches: int) -> DataLoader:
        anchor_idx, other_idx, relation = make_pairs(self.labels, self.neg_to_pos_ratio,
                                                     self.class_balancing, pass_rng(self.seed, pass_index))
        pairs = PairDataset(self.samples, anchor_idx, other_idx, relation, self.transform, self.load_truncated)
        if self.device_augment is not None:
            pairs = PairBytesDataset(pairs, self.device_augment[0])
        dataset = SeededItems(pairs, self.seed, pass_index)
        # Every rank drew the same pairs from the shared seed; the shards partition them.
        batches = ShardBatches(len(dataset), self.world_size, self.rank, self.seed, pass_index, self.batch_size,
                               skip_batches)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and self.device_augment is None, persistent_workers=False,
                          collate_fn=collate_pair_bytes if self.device_augment is not None else None)

    def batches(self, start_micro_step: int) -> Iterator[Tuple[int, tuple]]:
        """Endless (pass_index, batch) from the given global micro-step on."""
        pass_index, skip = divmod(start_micro_step, self.batches_per_pass)
        while True:
            for batch in self._loader(pass_index, skip):
                if self.device_augment is not None:
                    batch = augment_batch(batch, *self.device_augment)
                yield pass_index, batch
            pass_index, skip = pass_index + 1, 0
