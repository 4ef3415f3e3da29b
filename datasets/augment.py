"""The training augmentation split in two: drawing its random parameters, and applying them to whole batches.

`datasets.transforms.train_transform` (torchvision on PIL images, in DataLoader workers) draws and
applies in one go. For decoding and augmenting on the training device, a worker only reads the
file's bytes and draws the parameters (`draw_params`); the main process decodes a batch and
applies them with tensor operations (`apply_params`). `draw_params` consumes torch's global RNG
exactly as `train_transform` does (RandomResizedCrop, RandomHorizontalFlip, RandomApply around
ColorJitter, RandomGrayscale, in that order), so with the same per-pair seed both paths use the same
crop, flip, jitter and grayscale; the pixels then differ only by decoder and resampling rounding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from datasets.image_lists import DataError
from datasets.pairs import PairDataset
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

HUE_JITTER = 0.1  # the authors' ColorJitter hue range, fixed
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


@dataclass(frozen=True)
class AugmentSettings:
    """The flags of the training augmentation (train.py's --image_size, --min_scale, ... --random_grayscale)."""

    image_size: int
    min_scale: float
    max_scale: float
    horiz_flip: float
    jitter: float
    prob_jitter: float
    grayscale: float

    def pil_transform(self) -> T.Compose:
        """The per-image PIL pipeline that `draw_params` + `apply_params` reproduce."""
        from datasets.transforms import train_transform
        return train_transform(self.image_size, self.min_scale, self.max_scale, self.horiz_flip, self.jitter,
                               self.prob_jitter, self.grayscale)


@dataclass(frozen=True)
class AugmentParams:
    """One image's draw: crop box (top, left, height, width), flip, colour jitter (None: not applied), grayscale."""

    crop: tuple[int, int, int, int]
    flip: bool
    jitter_order: Optional[tuple[int, ...]]
    brightness: Optional[float]
    contrast: Optional[float]
    saturation: Optional[float]
    hue: Optional[float]
    grayscale: bool


def draw_params(width: int, height: int, settings: AugmentSettings) -> AugmentParams:
    """The parameters `train_transform` would draw for a width x height image, from torch's global RNG."""
    # A zero-stride view: RandomResizedCrop reads only the size.
    shape_only = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(1, height, width)
    crop = T.RandomResizedCrop.get_params(shape_only, [settings.min_scale, settings.max_scale], list(CROP_RATIO))
    flip = bool(torch.rand(1) < settings.horiz_flip)
    jitter = T.ColorJitter(settings.jitter, settings.jitter, settings.jitter, HUE_JITTER)
    order, brightness, contrast, saturation, hue = None, None, None, None, None
    if not settings.prob_jitter < torch.rand(1):  # RandomApply skips when p < u
        fn_idx, brightness, contrast, saturation, hue = T.ColorJitter.get_params(
            jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        order = tuple(int(i) for i in fn_idx)
    grayscale = bool(torch.rand(1) < settings.grayscale)
    return AugmentParams(crop, flip, order, brightness, contrast, saturation, hue, grayscale)


def image_size_of(data: bytes, path: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def apply_params(image: torch.Tensor, params: AugmentParams, image_size: int) -> torch.Tensor:
    """One decoded uint8 RGB image [3, H, W] (any device) -> the normalised float [3, S, S] training input."""
    top, left, height, width = params.crop
    # antialias=True: PIL's bilinear resize (the CPU path) also filters when it shrinks.
    out = TF.resized_crop(image, top, left, height, width, [image_size, image_size],
                          interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    if params.flip:
        out = TF.hflip(out)
    if params.jitter_order is not None:
        for fn_id in params.jitter_order:
            if fn_id == 0 and params.brightness is not None:
                out = TF.adjust_brightness(out, params.brightness)
            elif fn_id == 1 and params.contrast is not None:
                out = TF.adjust_contrast(out, params.contrast)
            elif fn_id == 2 and params.saturation is not None:
                out = TF.adjust_saturation(out, params.saturation)
            elif fn_id == 3 and params.hue is not None:
                out = TF.adjust_hue(out, params.hue)
    if params.grayscale:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return TF.normalize(out.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def decode_images(datas: Sequence[torch.Tensor], paths: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB [3, H, W] images on `device` from encoded bytes: JPEGs batched through nvJPEG on CUDA.

    Files that are not JPEGs, and every file on the CPU, are decoded on the CPU (torchvision's
    libjpeg-turbo / libpng) and moved to the device.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    images: list[Optional[torch.Tensor]] = [None] * len(datas)
    jpegs = [i for i, data in enumerate(datas) if device.type == "cuda" and bytes(data[:2].tolist()) == b"\xff\xd8"]
    if jpegs:
        decoded = decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, data in enumerate(datas):
        if images[i] is None:
            try:
                images[i] = decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
            except RuntimeError as error:
                raise DataError(f"cannot read image {paths[i]}: {str(error).splitlines()[0]}") from error
    return images


def read_image_bytes(path: str, load_truncated: bool = False) -> bytes:
    """A file's bytes; a JPEG cut before its end-of-image marker is refused as `load_image` refuses it
    (unless `load_truncated`: --load_truncated_images)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    # A JPEG ends with FF D9; a file cut short lacks it (the check PIL's strict decoding makes).
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") \
            and not load_truncated:
        raise DataError(f"cannot read image {path}: image file is truncated (no JPEG end marker)")
    return data


class PairBytesDataset(Dataset):
    """Pairs for device-side augmentation: workers read both files' bytes and draw both images' parameters.

    Item i: (bytes_a, bytes_b, params_a, params_b, anchor_class, relation, path_a, path_b), the
    parameters drawn in the order `PairDataset` transforms its two images (a, then b), so that under
    the same per-item seed both datasets augment alike. Truncated files follow `pairs.load_truncated`.
    """

    def __init__(self, pairs: PairDataset, settings: AugmentSettings) -> None:
        self.pairs = pairs
        self.settings = settings

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple:
        path_a, anchor_class = self.pairs.samples[self.pairs.anchor_idx[i]]
        path_b, _ = self.pairs.samples[self.pairs.other_idx[i]]
        item = []
        for path in (path_a, path_b):
            data = read_image_bytes(path, self.pairs.load_truncated)
            item.append((torch.frombuffer(bytearray(data), dtype=torch.uint8),
                         draw_params(*image_size_of(data, path), self.settings)))
        (data_a, params_a), (data_b, params_b) = item
        return data_a, data_b, params_a, params_b, int(anchor_class), int(self.pairs.relation[i]), path_a, path_b


def collate_pair_bytes(items: Sequence[tuple]) -> dict:
    """A batch of PairBytesDataset items: lists of bytes, parameters and paths; class and relation tensors."""
    data_a, data_b, params_a, params_b, anchor, relation, path_a, path_b = zip(*items)
    return {"data_a": list(data_a), "data_b": list(data_b), "params_a": list(params_a), "params_b": list(params_b),
            "anchor_class": torch.tensor(anchor), "relation": torch.tensor(relation),
            "path_a": list(path_a), "path_b": list(path_b)}


def augment_batch(batch: dict, settings: AugmentSettings, device: torch.device) -> tuple:
    """(images_a, images_b, anchor_class, relation) on `device` from a collated PairBytesDataset batch."""
    images = []
    for side in ("a", "b"):
        decoded = decode_images(batch[f"data_{side}"], batch[f"path_{side}"], device)
        images.append(torch.stack([apply_params(image, params, settings.image_size)
                                   for image, params in zip(decoded, batch[f"params_{side}"])]))
    return images[0], images[1], batch["anchor_class"], batch["relation"]
