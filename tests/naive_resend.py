"""The authors' prototype evaluation written naively, as the reference the batched pipeline is tested against."""
from typing import Sequence, Tuple

import numpy as np
import torch

from datasets.image_lists import Sample, load_image
from datasets.transforms import eval_transform
from models.objective import same_class_score


def naive_resend_scores(backbone, relational, support: Sequence[Sample], scored_paths: Sequence[str],
                        n_classes: int, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(normality, predicted class) per scored image: one image at a time, one prototype at a time."""
    transform = eval_transform(image_size)
    with torch.no_grad():
        def feature(path):
            return backbone(transform(load_image(path)).unsqueeze(0))[0]
        support_feats = torch.stack([feature(p) for p, _ in support])
        labels = torch.tensor([label for _, label in support])
        prototypes = [support_feats[labels == c].mean(0) for c in range(n_classes)]
        scores, preds = [], []
        for path in scored_paths:
            target = feature(path)
            sims = torch.stack([same_class_score(relational(target[None], proto[None]), "L2")[0]
                                for proto in prototypes])
            probs = torch.softmax(sims, dim=0)
            scores.append(float(probs.max()))
            preds.append(int(probs.argmax()))
    return np.array(scores), np.array(preds)
