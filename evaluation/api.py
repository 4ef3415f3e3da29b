"""Plug-and-play Python API: load a checkpoint folder, set the known classes, score new images.

    from evaluation.api import NoveltyDetector
    detector = NoveltyDetector.from_folder("outputs/ImageNet_resnet18_rel_transformer")
    detector.fit(["cat1.jpg", "cat2.jpg", "dog1.jpg"], [0, 0, 1])   # support images and labels
    result = detector.score(["query.jpg"])                           # result.normality, result.pred

`from_folder` uses the input size and head count the run folder's `args.json` records (as
`train.py --only_eval` does); `detector.settings` says what was used and where it came from.
"""
from typing import Any, Dict, Optional, Sequence, Union

import torch
from PIL import Image

from datasets.image_lists import load_image
from datasets.transforms import eval_transform
from evaluation.evaluate import default_pair_chunk, relational_pair_logits
from evaluation.run_settings import backbone_record, loaded_from, loaded_line, model_facts, resolve_run_settings
from evaluation.scorers import FeatureBatch, ScoreResult, Scorer, ScoringInputs, build_scorer, fit_scorer
from evaluation.scorers.maps import PrototypeMapScorer
from models.backbone import fold_batchnorm
from models.checkpoint import LoadedModel, load_model_folder
from utils.precision import autocast

ImageLike = Union[str, Image.Image]


class NoveltyDetector:
    """ReSeND as a library: features of images, prototypes of known classes, normality scores."""

    def __init__(self, model: LoadedModel, device: Union[str, torch.device] = "cpu", amp: str = "none",
                 image_size: int = 224, scorer: str = "resend", nnk: int = 1, batch_size: int = 64,
                 load_truncated_images: bool = False) -> None:
        self.model = model
        # As train.py's --load_truncated_images: decode truncated image files grey-filled (warned) instead of refusing.
        self.load_truncated_images = load_truncated_images
        self.device = torch.device(device)
        self.amp = amp
        self.image_size = image_size
        self.transform = eval_transform(image_size)
        self.batch_size = batch_size
        model.backbone.to(self.device).eval()
        model.relational.to(self.device).eval()
        # Features come from a BatchNorm-folded copy (same function, faster); `model` stays as loaded.
        self._backbone = fold_batchnorm(model.backbone)
        self.scorer: Scorer = build_scorer(scorer, {"NNK": nnk})
        if self.scorer.needs_block_norms:
            raise ValueError(f"scorer {scorer!r} needs per-block feature norms of jigsaw-shuffled support "
                             "images, which the API does not compute; use train.py --only_eval --evaluator")
        self._pair_logits = relational_pair_logits(model.relational, self.device, amp)
        self._fitted = False
        # What the scores depend on; from_folder adds where the settings came from.
        self.settings: Dict[str, Any] = {"checkpoint": model.folder, "loaded_from": loaded_from(model),
                                         "iteration": model.iteration,
                                         **model_facts(model.backbone, model.relational),
                                         **backbone_record(model.backbone_file),
                                         "image_size": image_size, "run_args": None, "overrides": {}}

    @classmethod
    def from_folder(cls, folder: str, device: Union[str, torch.device] = "cpu", n_heads: Optional[int] = None,
                    image_size: Optional[int] = None, verbose: bool = True, backbone_checkpoint: Optional[str] = None,
                    **kwargs: Any) -> "NoveltyDetector":
        """Load a checkpoint folder (authors' or ours) with the settings its `args.json` records.

        `n_heads` and `image_size` given here override `args.json` (reported as overrides); a folder
        without it (the authors' release) gets 12 heads and 224 px. `backbone_checkpoint` (a ResNet
        state-dict file, e.g. a classifier fine-tuned on the known classes; see models.backbone_file)
        replaces the folder's backbone under its relational module. With `verbose`, prints where the
        settings and the weights came from. `detector.settings` records all of it (with a backbone
        file: its path, SHA-256 and the loaded line).
        """
        given = {"image_size": 224 if image_size is None else image_size,
                 "transf_n_heads": 12 if n_heads is None else n_heads}
        explicit = {name for name, value in (("image_size", image_size), ("transf_n_heads", n_heads))
                    if value is not None}
        run = resolve_run_settings(folder, given, explicit, keywords=True)
        model = load_model_folder(folder, n_heads=run.n_heads, device=str(device), backbone_file=backbone_checkpoint)
        if verbose:
            for line in [*run.messages, loaded_line(model)]:
                print(line, flush=True)
        detector = cls(model, device=device, image_size=run.image_size, **kwargs)
        detector.settings.update(run_args=run.run_args, overrides=run.overrides)
        return detector

    @torch.inference_mode()
    def _backbone_pass(self, images: Sequence[ImageLike], with_maps: bool) -> tuple:
        """(features [N, D], last feature maps [N, D, h, w] float32 or None) of image paths or PIL images."""
        feats, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = [self.transform(load_image(x, self.load_truncated_images) if isinstance(x, str)
                                    else x.convert("RGB")) for x in images[start:start + self.batch_size]]
            pixels = torch.stack(batch).to(self.device).contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                out = self._backbone(pixels, return_feature_map=with_maps)
            if with_maps:
                out, feature_map = out
                maps.append(feature_map.float().contiguous())
            feats.append(out.float())
        if not feats:
            raise ValueError("no images given")
        return torch.cat(feats), torch.cat(maps) if with_maps else None

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Backbone features [N, D] of image paths or PIL images."""
        return self._backbone_pass(images, with_maps=False)[0]

    def features_and_maps(self, images: Sequence[ImageLike]) -> tuple:
        """(features [N, D], last feature maps [N, D, h, w] float32) of image paths or PIL images, one pass."""
        return self._backbone_pass(images, with_maps=True)

    def _as_features(self, inputs: Union[torch.Tensor, Sequence[ImageLike]]) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim != 2 or inputs.shape[1] != self.model.backbone.feat_dim:
                raise ValueError(f"features must have shape [N, {self.model.backbone.feat_dim}], "
                                 f"got {tuple(inputs.shape)}")
            return inputs.to(self.device).float()
        return self.features(inputs)

    def _support_batch(self, support: Union[torch.Tensor, Sequence[ImageLike]], labels: Sequence[int]) -> FeatureBatch:
        """Support features with their labels, as many of each."""
        feats = self._as_features(support)
        label_tensor = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        if label_tensor.numel() != feats.shape[0]:
            raise ValueError(f"{feats.shape[0]} support samples but {label_tensor.numel()} labels")
        return FeatureBatch(feats, label_tensor)

    def fit(self, support: Union[torch.Tensor, Sequence[ImageLike]], labels: Sequence[int]) -> "NoveltyDetector":
        """Known classes from support images (or their features) and labels 0..C-1."""
        # A fresh FitCache per fit (ScoringInputs' default): nothing fitted on an earlier support set is reused.
        inputs = ScoringInputs(support=self._support_batch(support, labels), pair_logits=self._pair_logits,
                               pair_chunk=default_pair_chunk(self.device))
        fit_scorer(self.scorer, inputs)
        self._fitted = True
        return self

    def score(self, queries: Union[torch.Tensor, Sequence[ImageLike]]) -> ScoreResult:
        """Normality (higher = more likely a known class) and predicted known class per query."""
        if not self._fitted:
            raise RuntimeError("call fit() with the support set before score()")
        if self.scorer.needs_feature_maps and not isinstance(queries, torch.Tensor):
            # A scorer that maps reads the feature maps of the images (features alone give 1 x 1 maps).
            feats, maps = self.features_and_maps(queries)
            return self.scorer.score(FeatureBatch(feats, feature_maps=maps))
        return self.scorer.score(FeatureBatch(self._as_features(queries)))

    def anomaly_maps(self, images: Sequence[ImageLike], support: Optional[Sequence[ImageLike]] = None,
                     labels: Optional[Sequence[int]] = None) -> ScoreResult:
        """Novelty map of every image: `result.maps` [N, h, w] (1 - the best cosine of each location of the
        backbone's last feature map to a class prototype; 7 x 7 at 224 px), `result.normality` the
        prototype_map image score, `result.pred` the nearest prototype of the pooled feature.

        The prototypes are the class means of `support` (images or features, with `labels`) when given,
        else those of the support set given to `fit` when the detector's scorer is prototype_map.
        """
        if support is not None:
            if labels is None:
                raise ValueError("anomaly_maps: support images need their labels")
            mapper = PrototypeMapScorer()
            mapper.fit(ScoringInputs(support=self._support_batch(support, labels)))
        elif isinstance(self.scorer, PrototypeMapScorer) and self._fitted:
            mapper = self.scorer
        else:
            raise ValueError("anomaly_maps needs class prototypes: pass support= and labels=, or build the detector "
                             "with scorer='prototype_map' and call fit() first")
        feats, maps = self.features_and_maps(images)
        return mapper.score(FeatureBatch(feats, feature_maps=maps))
