"""Backbone features of an image list, computed once, in batches, sharded over processes."""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from datasets.image_lists import ImageListDataset, Sample
from datasets.transforms import eval_transform
from utils.distributed import gather_by_index, get_world_size, is_main_process
from utils.precision import autocast


@dataclass
class FeatureSet:
    """Features of (a shard of) an image list: row k belongs to sample `indices[k]` of the list."""

    feats: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    total: int
    block_norms: Optional[torch.Tensor] = None

    def gathered(self) -> "FeatureSet":
        """The full list on every process, in list order (identity in a single process)."""
        if get_world_size() == 1:
            return self
        gather = lambda values: gather_by_index(values, self.indices, self.total)  # noqa: E731
        return FeatureSet(
            feats=gather(self.feats),
            labels=gather(self.labels),
            indices=torch.arange(self.total, device=self.indices.device),
            total=self.total,
            block_norms=None if self.block_norms is None else gather(self.block_norms),
        )


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, samples: Sequence[Sample], image_size: int,
                     batch_size: int, num_workers: int, device: torch.device, amp: str = "none",
                     return_block_norms: bool = False, desc: str = "features",
                     transform: Optional[Callable] = None) -> FeatureSet:
    """Run the backbone once over `samples`; each process handles its DistributedSampler shard.

    `transform` replaces the evaluation transform (FeatureNorm's jigsaw-shuffled support images).
    """
    dataset = ImageListDataset(list(samples), transform or eval_transform(image_size))
    sampler = None
    if get_world_size() > 1:
        # shuffle=False keeps shards deterministic; the padding duplicates are dropped on gather.
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    backbone.eval()
    feats, labels, indices, norms = [], [], [], []
    for images, batch_labels, batch_indices in tqdm(loader, desc=desc, leave=False,
                                                    # None: tqdm hides itself when not on a terminal (logs, CI).
                                                    disable=None if is_main_process() else True):
        # channels_last is markedly faster for convolutions on CPU (oneDNN) and on CUDA, and
        # changes results only by float rounding.
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = backbone(images, return_block_norms=return_block_norms)
        if return_block_norms:
            out, block_norm = out
            norms.append(block_norm.float())
        feats.append(out.float())
        labels.append(batch_labels.to(device))
        indices.append(batch_indices.to(device))
    feat_dim = getattr(backbone, "feat_dim", 0)
    return FeatureSet(
        feats=torch.cat(feats) if feats else torch.empty(0, feat_dim, device=device),
        labels=torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device),
        indices=torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=device),
        total=len(dataset),
        block_norms=torch.cat(norms) if norms else None,
    )
