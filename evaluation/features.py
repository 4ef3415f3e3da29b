"""Backbone features of image sets, computed once per image, in one DataLoader pass, sharded over processes."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.data.distributed import DistributedSampler
from datasets.image_lists import ImageListDataset
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
                           return_feature_maps: Union[bool, Sequence[bool]] = False,
                           load_truncated: bool = False) -> List[ImageFeatures]:
    """Features of every image of every (paths, transform) part, every process getting all of them.

    All parts go through one DataLoader, so its worker processes start and stop once however many
    image sets an evaluation needs (support, scored, jigsaw-shuffled support, several targets);
    each process handles its DistributedSampler shard and the shards are gathered in list order.
    With `return_feature_maps` (True, or one flag per part) the last feature map of every image of
    those parts is kept too, stored as float16; the other parts' maps are dropped batch by batch, so
    that memory holds only the maps asked for (at 224 px, 49 KiB per image). `load_truncated`
    (--load_truncated_images) is handed to the datasets, and with them to the workers.
    """
    parts = list(parts)
    datasets = [ImageListDataset([(path, 0) for path in paths], transform, load_truncated)
                for paths, transform in parts]
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
    wants_map = _map_mask(return_feature_maps, [len(part) for part in datasets], device)
    # The loader visits the sampler's indices in order (an item's own index is within its part only).
    global_indices = _global_indices(sampler, total, device)
    feats, norms, maps, map_indices = [], [], [], []
    visited = 0
    for images, _, _ in progress(loader, total=len(loader), desc=desc, unit="batch"):
        # channels_last is markedly faster for convolutions on CPU (oneDNN) and on CUDA, and
        # changes results only by float rounding.
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        batch_indices = global_indices[visited:visited + images.shape[0]]
        visited += images.shape[0]
        with autocast(device, amp):
            if wants_map is not None:
                out, *extras, feature_map = backbone(images, return_block_norms=return_block_norms,
                                                     return_feature_map=True)
                keep = wants_map[batch_indices]
                maps.append(feature_map[keep].to(torch.float16).contiguous())
                map_indices.append(batch_indices[keep])
                out = (out, *extras) if return_block_norms else out
            else:
                out = backbone(images, return_block_norms=return_block_norms)
        if return_block_norms:
            out, block_norm = out
            norms.append(block_norm.float())
        feats.append(out.float())
    all_feats = gather_by_index(torch.cat(feats), global_indices, total)
    all_norms = gather_by_index(torch.cat(norms), global_indices, total) if norms else None
    all_maps = None
    if wants_map is not None:
        # Maps are stored compactly: row r of all_maps is the r-th image (in dataset order) that wants one.
        map_row = torch.cumsum(wants_map.long(), dim=0) - 1
        all_maps = gather_by_index(torch.cat(maps), map_row[torch.cat(map_indices)], int(wants_map.sum()))
    map_start = 0
    results, start = [], 0
    for part, part_maps in zip(datasets, _map_flags(return_feature_maps, len(datasets))):
        stop = start + len(part)
        part_map_rows = None
        if part_maps:
            part_map_rows = all_maps[map_start:map_start + len(part)]
            map_start += len(part)
        results.append(ImageFeatures(all_feats[start:stop], None if all_norms is None else all_norms[start:stop],
                                     part_map_rows))
        start = stop
    return results


def _map_flags(return_feature_maps: Union[bool, Sequence[bool]], n_parts: int) -> List[bool]:
    """One flag per part: whether its images' feature maps are kept."""
    if isinstance(return_feature_maps, bool):
        return [return_feature_maps] * n_parts
    flags = [bool(flag) for flag in return_feature_maps]
    if len(flags) != n_parts:
        raise ValueError(f"return_feature_maps has {len(flags)} flags for {n_parts} parts")
    return flags


def _map_mask(return_feature_maps: Union[bool, Sequence[bool]], part_sizes: List[int],
              device: torch.device) -> Optional[torch.Tensor]:
    """[total] bool: which images of the concatenated parts keep their feature map (None: none)."""
    flags = _map_flags(return_feature_maps, len(part_sizes))
    if not any(flags):
        return None
    return torch.cat([torch.full((size,), flag, dtype=torch.bool, device=device)
                      for size, flag in zip(part_sizes, flags)])


def _global_indices(sampler: Optional[DistributedSampler], total: int, device: torch.device) -> torch.Tensor:
    """The dataset indices this process's loader visited, in order (its sampler's shard, or all)."""
    order = list(iter(sampler)) if sampler is not None else range(total)
    return torch.as_tensor(list(order), dtype=torch.long, device=device)

