"""Backbone features of image sets, computed once per image, in one DataLoader pass, sharded over processes."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.data.distributed import DistributedSampler
from datasets.image_lists import ImageListDataset, Sample
from datasets.transforms import eval_transform
from utils.distributed import gather_by_index, get_world_size
from utils.precision import autocast
from utils.progress import progress


@dataclass
class ImageFeatures:
    """Features [N, D] of an image list, in list order, and optionally its per-block FeatureNorms [N, B]
    and its last feature maps [N, D, h, w] (float16: half the memory of float32)."""

    feats: torch.Tensor
    block_norms: Optional[torch.Tensor] = None
    feature_maps: Optional[torch.Tensor] = None


@torch.inference_mode()
def extract_image_features(backbone: torch.nn.Module, parts: Sequence[Tuple[Sequence[str], Callable]],
                           batch_size: int, num_workers: int, device: torch.device, amp: str = "none",
                           return_block_norms: bool = False, desc: str = "features",
                           return_feature_maps: bool = False) -> List[ImageFeatures]:
    """Features of every image of every (paths, transform) part, every process getting all of them.

    All parts go through one DataLoader, so its worker processes start and stop once however many
    image sets an evaluation needs (support, scored, jigsaw-shuffled support, several targets);
    each process handles its DistributedSampler shard and the shards are gathered in list order.
    With `return_feature_maps` the last feature map of every image is kept too, stored as float16.
    """
    parts = list(parts)
    datasets = [ImageListDataset([(path, 0) for path in paths], transform) for paths, transform in parts]
    dataset = ConcatDataset(datasets) if datasets else []
    total = len(dataset)
    if total == 0:
        empty = torch.empty(0, getattr(backbone, "feat_dim", 0), device=device)
        return [ImageFeatures(empty) for _ in parts]
    sampler = None
    if get_world_size() > 1:
        # shuffle=False keeps shards deterministic; the padding duplicates are dropped on gather.
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
    backbone.eval()
    feats, norms, maps = [], [], []
    for images, _, _ in progress(loader, total=len(loader), desc=desc, unit="batch"):
        # channels_last is markedly faster for convolutions on CPU (oneDNN) and on CUDA, and
        # changes results only by float rounding.
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            if return_feature_maps:
                out, *extras, feature_map = backbone(images, return_block_norms=return_block_norms,
                                                     return_feature_map=True)
                maps.append(feature_map.to(torch.float16).contiguous())
                out = (out, *extras) if return_block_norms else out
            else:
                out = backbone(images, return_block_norms=return_block_norms)
        if return_block_norms:
            out, block_norm = out
            norms.append(block_norm.float())
        feats.append(out.float())
    # The loader visits the sampler's indices in order (an item's own index is within its part only).
    global_indices = _global_indices(sampler, total, device)
    all_feats = gather_by_index(torch.cat(feats), global_indices, total)
    all_norms = gather_by_index(torch.cat(norms), global_indices, total) if norms else None
    all_maps = gather_by_index(torch.cat(maps), global_indices, total) if maps else None
    results, start = [], 0
    for part in datasets:
        stop = start + len(part)
        results.append(ImageFeatures(all_feats[start:stop], None if all_norms is None else all_norms[start:stop],
                                     None if all_maps is None else all_maps[start:stop]))
        start = stop
    return results


def _global_indices(sampler: Optional[DistributedSampler], total: int, device: torch.device) -> torch.Tensor:
    """The dataset indices this process's loader visited, in order (its sampler's shard, or all)."""
    order = list(iter(sampler)) if sampler is not None else range(total)
    return torch.as_tensor(list(order), dtype=torch.long, device=device)


def extract_features(backbone: torch.nn.Module, samples: Sequence[Sample], image_size: int, batch_size: int,
                     num_workers: int, device: torch.device, amp: str = "none", return_block_norms: bool = False,
                     desc: str = "features", transform: Optional[Callable] = None) -> ImageFeatures:
    """Features of one image list with the evaluation transform (or `transform`), in list order."""
    (result,) = extract_image_features(backbone, [([path for path, _ in samples],
                                                   transform or eval_transform(image_size))],
                                       batch_size, num_workers, device, amp, return_block_norms, desc)
    return result
