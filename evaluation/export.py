"""A deployable ReSeND detector in one file: a torch.export program (`.pt2`) that needs no project code.

The program holds the BatchNorm-folded backbone, the relational module, its head and the class
prototypes (mean support feature per class, as the `resend` scorer fits them). It takes RGB pixels
already resized to the export's input size, uint8 [N, S, S, 3] (N free), normalises them itself and
returns, per image:

- `normality`: the `resend` scorer's normality, max over the known classes of the softmax of the
  per-prototype scores (higher = more likely a known class; in (1/C, 1]);
- `novelty`: 1 - normality (higher = more likely novel);
- `nearest_class`: the argmax class (an index into the metadata's `class_names`);
- `similarity`: that class's per-pair score (the negated raw logit of an L2 head, the same-class
  logit of a CE head; see `evaluation.scorers.resend.resend_similarity`).

The metadata (`METADATA_NAME` in the archive's extra files, JSON) says how to get the pixels
(PIL, RGB, bilinear resize to S x S without keeping the aspect ratio, as `eval_transform` does),
the class names and where the weights and prototypes came from. torch.export rather than
TorchScript: torch.jit.trace/script are deprecated in the torch this project pins (2.14 warns on
every call), while an ExportedProgram is the format torch keeps loading, with a dynamic batch
dimension and a shape check that names the expected size.
"""
import copy
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from datasets.image_lists import load_image
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from evaluation.api import NoveltyDetector
from evaluation.scorers.resend import resend_similarity
from models.backbone import ResNetBackbone, fold_batchnorm
from utils.atomic_files import TEMP_FILE_PREFIX, writer_tag

FORMAT_NAME = "resend-exported-detector"
FORMAT_VERSION = 1
METADATA_NAME = "resend_detector.json"
OUTPUT_NAMES = ("normality", "novelty", "nearest_class", "similarity")
# Exported program vs the in-repository scorer on the same images in the same batch: only float
# rounding may differ (the export's decompositions; features computed on a GPU for the repository).
CHECK_TOLERANCE = 1e-4

ImageLike = Union[str, Image.Image]


class ExportError(ValueError):
    """An exported detector that cannot be written, read or used as given."""


class DeployableDetector(nn.Module):
    """uint8 RGB pixels [N, S, S, 3] -> the `resend` scores of each image against fixed class prototypes."""

    def __init__(self, backbone: ResNetBackbone, relational: nn.Module, prototypes: Tensor) -> None:
        super().__init__()
        self.backbone = fold_batchnorm(backbone)
        self.relational = relational.eval()
        self.register_buffer("prototypes", prototypes.detach().float().clone())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Dict[str, Tensor]:
        """The four outputs of OUTPUT_NAMES, each [N]."""
        # ToTensor then Normalize of eval_transform, in the same order and precision.
        images = pixels.permute(0, 3, 1, 2).float().div(255).sub(self.mean).div(self.std)
        # The permuted NHWC pixels have channels_last strides, as the repository's feature extraction
        # uses; kept so, the CPU convolutions round alike (and run faster).
        feats = self.backbone(images.contiguous(memory_format=torch.channels_last))
        n_images, n_classes, dim = feats.shape[0], self.prototypes.shape[0], feats.shape[1]
        # Every (image, prototype) pair, image first as in the scorer (pairwise_similarity).
        scored = feats.unsqueeze(1).expand(n_images, n_classes, dim).reshape(n_images * n_classes, dim)
        references = self.prototypes.unsqueeze(0).expand(n_images, n_classes, dim).reshape(n_images * n_classes, dim)
        # No .float() on the logits: it would be exported as an assertion that they are float32, which
        # fails under torch.autocast (where a consumer may run the program in bf16).
        similarity = resend_similarity(self.relational(scored, references)).view(n_images, n_classes)
        normality, nearest = torch.softmax(similarity, dim=1).max(dim=1)
        return {"normality": normality, "novelty": 1 - normality, "nearest_class": nearest,
                "similarity": similarity.gather(1, nearest.unsqueeze(1)).squeeze(1)}


def export_program(module: DeployableDetector, image_size: int) -> "torch.export.ExportedProgram":
    """The module traced by torch.export on the CPU, with a free batch dimension."""
    module = module.cpu().eval()
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={"pixels": {0: batch}})


def preprocessing_facts(image_size: int) -> Dict[str, Any]:
    """How a consumer turns an image into the program's input (what `eval_transform` does)."""
    return {"image_size": image_size, "convert": "RGB",
            "resize": {"size": [image_size, image_size], "interpolation": "bilinear",
                       "library": "Pillow", "call": f"image.resize(({image_size}, {image_size}), Image.BILINEAR)",
                       "keep_aspect_ratio": False},
            "input": {"name": "pixels", "dtype": "uint8", "shape": ["N", image_size, image_size, 3],
                      "layout": "NHWC, RGB, 0-255"},
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "normalisation": "inside the program: (pixels / 255 - mean) / std per channel"}


OUTPUT_DOCS = {
    "normality": "resend normality: max over known classes of the softmax of the per-prototype similarities "
                 "(higher = known)",
    "novelty": "1 - normality (higher = novel)",
    "nearest_class": "argmax class, an index into class_names",
    "similarity": "per-pair score of nearest_class: negated raw relational logit (L2 head) or same-class "
                  "logit (CE head)",
}


def pixels_of(image: Image.Image, image_size: int) -> Tensor:
    """uint8 [S, S, 3] of an RGB image resized as the metadata says (and as `eval_transform` does)."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())


@dataclass
class ExportedDetector:
    """An exported detector read back: the program (a callable module) and its metadata."""

    path: str
    program: nn.Module
    metadata: Dict[str, Any]

    @property
    def image_size(self) -> int:
        """The square input size the program was exported for."""
        return int(self.metadata["preprocessing"]["image_size"])

    @property
    def class_names(self) -> List[str]:
        """Names of the known classes, by `nearest_class` index."""
        return list(self.metadata["class_names"])

    def score_pixels(self, pixels: Tensor) -> Dict[str, Tensor]:
        """Outputs of the program for uint8 pixels [N, S, S, 3]; any other shape or dtype is refused."""
        size = self.image_size
        if (not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8 or pixels.ndim != 4
                or tuple(pixels.shape[1:]) != (size, size, 3) or pixels.shape[0] < 1):
            got = (f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, Tensor) else type(pixels).__name__)
            raise ExportError(f"{self.path} expects uint8 RGB pixels of shape [N, {size}, {size}, 3] (resize "
                              f"images to {size} x {size} first, or pass them to score()); got {got}")
        with torch.no_grad():
            return self.program(pixels)

    def score(self, images: Sequence[ImageLike]) -> Dict[str, Tensor]:
        """Outputs for image paths or PIL images, each resized to the export's size as the metadata says."""
        if not images:
            raise ExportError("no images given")
        loaded = [load_image(image) if isinstance(image, str) else image for image in images]
        return self.score_pixels(torch.stack([pixels_of(image, self.image_size) for image in loaded]))


def read_exported(source: str, name: str) -> ExportedDetector:
    """The program and metadata of the exported file at `source`; ExportError naming it (`name`) if unreadable."""
    extra = {METADATA_NAME: ""}
    try:
        program = torch.export.load(source, extra_files=extra)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch reports a damaged archive with several exception types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"cannot read exported detector {name}: not a complete .pt2 archive ({reason})") from error
    if not extra[METADATA_NAME]:
        raise ExportError(f"{name} is a .pt2 program but not a ReSeND exported detector (no {METADATA_NAME})")
    try:
        metadata = json.loads(extra[METADATA_NAME])
    except ValueError as error:
        raise ExportError(f"{name}: unreadable {METADATA_NAME}: {error}") from error
    if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{name}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}; "
                          f"this reader knows {FORMAT_NAME!r} version {FORMAT_VERSION}")
    return ExportedDetector(path=name, program=program.module(), metadata=metadata)


def load_exported(path: str) -> ExportedDetector:
    """Read an exported detector file; one-line errors for a missing, damaged or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported detector not found: {path}")
    return read_exported(path, path)


def compare_with_repository(exported: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                            name: str) -> Dict[str, float]:
    """Largest differences to the in-repository scores; ExportError when beyond CHECK_TOLERANCE."""
    same_class = torch.equal(exported["nearest_class"].cpu(), expected["nearest_class"].cpu())
    gaps = {key: float((exported[key].float().cpu() - expected[key].float().cpu()).abs().max())
            for key in ("normality", "similarity")}
    if not same_class or any(gap > CHECK_TOLERANCE for gap in gaps.values()):
        raise ExportError(f"{name} does not reproduce the in-repository resend scores: max |normality diff| "
                          f"{gaps['normality']:.3g}, max |similarity diff| {gaps['similarity']:.3g} (tolerance "
                          f"{CHECK_TOLERANCE:g}), same nearest class: {same_class}; nothing was written")
    return gaps


def write_exported(program: "torch.export.ExportedProgram", metadata: Mapping[str, Any], path: str,
                   check_images: Sequence[Image.Image], expected: Mapping[str, Tensor]) -> Dict[str, float]:
    """Save program + metadata to a temp file beside `path`, read it back, compare its scores of
    `check_images` with `expected` (the repository's), and only then move it to `path`.

    Returns the largest differences; on any failure nothing is left at `path` or beside it.
    """
    parent = os.path.dirname(os.path.abspath(path))
    handle, temp_path = tempfile.mkstemp(dir=parent, prefix=TEMP_FILE_PREFIX + writer_tag(), suffix=".pt2")
    os.close(handle)
    try:
        torch.export.save(program, temp_path, extra_files={METADATA_NAME: json.dumps(metadata, indent=1)})
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        reread = read_exported(temp_path, path)
        gaps = compare_with_repository(reread.score(list(check_images)), expected, path)
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return gaps


# Images of the support set scored both ways before the file is moved into place.
CHECK_IMAGES = 4


def export_detector(detector: NoveltyDetector, support: Sequence[Tuple[str, int]], class_names: Sequence[str],
                    path: str, provenance: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Fit `detector` (scorer resend) on `support`, export it with its prototypes and write `path`.

    `provenance` (checkpoint, dataset, target, settings) goes into the metadata as given. Returns the
    metadata and the largest differences of the check against the in-repository scores.
    """
    if detector.scorer.name != "resend":
        raise ExportError(f"only the resend scorer can be exported; the detector uses {detector.scorer.name!r}")
    labels = [label for _, label in support]
    if sorted(set(labels)) != list(range(len(class_names))):
        raise ExportError(f"the support labels {sorted(set(labels))} do not cover the {len(class_names)} class "
                          f"names 0..{len(class_names) - 1}")
    detector.fit([image_path for image_path, _ in support], labels)
    prototypes = detector.scorer.prototypes
    module = DeployableDetector(detector.model.backbone, copy.deepcopy(detector.model.relational).cpu(),
                                prototypes.cpu())
    program = export_program(module, detector.image_size)
    # One image of each of the first classes: their scores spread over classes and values.
    firsts = list({label: image_path for image_path, label in reversed(support)}.items())
    check_images = [load_image(image_path, detector.load_truncated_images)
                    for _, image_path in sorted(firsts)[:CHECK_IMAGES]]
    result = detector.score(check_images)
    expected = {"normality": result.normality, "nearest_class": result.pred,
                "similarity": result.extra["max_logit"]}
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "scorer": "resend",
                "outputs": OUTPUT_DOCS, "preprocessing": preprocessing_facts(detector.image_size),
                "class_names": list(class_names),
                "support_images_per_class": {name: int(count) for name, count in zip(class_names, counts)},
                "model": {key: detector.settings[key] for key in ("network", "objective", "depth", "embed_dim",
                                                                   "n_heads")},
                "provenance": {"checkpoint": os.path.abspath(detector.settings["checkpoint"]),
                               "loaded_from": detector.settings["loaded_from"],
                               "iteration": detector.settings["iteration"],
                               "run_args": detector.settings["run_args"],
                               "overrides": detector.settings["overrides"],
                               # With a backbone read from its own file: its path, SHA-256 and load line.
                               "backbone_checkpoint": None,
                               **{key: value for key, value in detector.settings.items()
                                  if key.startswith("backbone_")},
                               **provenance},
                "exported_with": {"torch": torch.__version__, "device": "cpu", "dtype": "float32",
                                  "batchnorm": "folded into the convolutions"}}
    gaps = write_exported(program, metadata, path, check_images, expected)
    return metadata, gaps
