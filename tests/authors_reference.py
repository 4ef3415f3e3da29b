"""The authors' evaluation, written from their published algorithm one image at a time.

This is the reference the batched pipeline (`train.py --only_eval`, `NoveltyDetector`) is tested
against. It imports nothing of the project's feature extraction, scoring or metrics: only the
network modules being evaluated. What it computes, following the authors' `evals/eval.py` and
`train.py` (FrancescoCappio/ReSeND):

- features: one image per backbone call; the image is opened with PIL, converted to RGB, resized
  to a square, turned into a tensor and normalised with the ImageNet mean and std;
- ReSeND (class-mean prototypes): per known class the mean support feature; for each target one
  relational call on the pairs (target, prototype c) for every class c, target first; the per-pair
  score is the negated raw head output (L2 head, one output) or the same-class output (CE head,
  column 0); a softmax over the classes; normality = its max, predicted class = its argmax;
- most significant prototypes: per class, the support image nearest the class mean is moved to the
  front, then greedy farthest-point picks with distances in float16 (ties to the first row); a
  class's score is the best score over its prototypes; normality = the max over classes (the
  authors' reported "max logit"); the softmax over the per-class scores is their second figure;
- kNN: the scores against every support image; normality = the mean of the K largest;
- metrics: AUROC with known classes positive, and the false positive rate at the threshold whose
  recall is nearest 95% (of equally near ones, the lowest threshold; only thresholds at or above
  the lowest known score).
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def reference_features(backbone: torch.nn.Module, paths: Sequence[str], image_size: int) -> torch.Tensor:
    """[N, D] features, one image per backbone call."""
    to_input = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                   transforms.Normalize(MEAN, STD)])
    backbone.eval()
    rows = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                rows.append(backbone(to_input(image.convert("RGB")).unsqueeze(0))[0])
    return torch.stack(rows)


def _scores_against(relational: torch.nn.Module, target: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[R] authors' scores of one target against every reference row, in one relational call."""
    with torch.no_grad():
        out = relational(target.unsqueeze(0).expand(references.shape[0], -1), references)
    return -out[:, 0] if out.shape[1] == 1 else out[:, 0]


def reference_resend(relational: torch.nn.Module, support: torch.Tensor, support_labels: Sequence[int],
                     targets: torch.Tensor, n_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(normality, predicted class) of class-mean prototype scoring."""
    labels = torch.as_tensor(list(support_labels))
    prototypes = torch.stack([support[labels == c].mean(0) for c in range(n_classes)])
    normality, preds = [], []
    for target in targets:
        probabilities = torch.softmax(_scores_against(relational, target, prototypes), dim=0)
        normality.append(float(probabilities.max()))
        preds.append(int(probabilities.argmax()))
    return np.array(normality), np.array(preds)


def reference_coreset(class_feats: torch.Tensor, k: int) -> List[int]:
    """Row indices (into class_feats) of the authors' k most significant samples of one class."""
    n = class_feats.shape[0]
    nearest = int(torch.norm(class_feats - class_feats.mean(0), dim=1).argmin())
    order = list(range(n))
    order[0], order[nearest] = nearest, 0
    feats = class_feats[order]
    min_distance = torch.norm(feats - feats[0], dim=1).half()
    feats = feats.half()
    picked = [0]
    for _ in range(k - 1):
        min_distance = torch.minimum(min_distance, torch.norm(feats - feats[picked[-1]], dim=1))
        choice = int(torch.argmax(min_distance))
        min_distance[choice] = 0
        picked.append(choice)
    # Past the class size the authors' loop repeats row 0; a repeat adds nothing to a max.
    return [order[i] for i in dict.fromkeys(picked)]


def reference_most_significant(relational: torch.nn.Module, support: torch.Tensor,
                               support_labels: Sequence[int], targets: torch.Tensor, n_classes: int,
                               k: int) -> Dict[str, np.ndarray]:
    """max_logit (the authors' reported normality), max_softmax and pred of the NNK variant."""
    labels = torch.as_tensor(list(support_labels))
    prototypes, owners = [], []
    for c in range(n_classes):
        members = support[labels == c]
        for row in reference_coreset(members, k):
            prototypes.append(members[row])
            owners.append(c)
    prototypes = torch.stack(prototypes)
    owners = torch.tensor(owners)
    max_logit, max_softmax, preds = [], [], []
    for target in targets:
        scores = _scores_against(relational, target, prototypes)
        per_class = torch.stack([scores[owners == c].max() for c in range(n_classes)])
        max_logit.append(float(per_class.max()))
        preds.append(int(per_class.argmax()))
        max_softmax.append(float(torch.softmax(per_class, dim=0).max()))
    return {"max_logit": np.array(max_logit), "max_softmax": np.array(max_softmax), "pred": np.array(preds)}


def reference_knn(relational: torch.nn.Module, support: torch.Tensor, targets: torch.Tensor, k: int) -> np.ndarray:
    """Normality of the kNN variant: mean of the k largest scores against the support images."""
    return np.array([float(torch.topk(_scores_against(relational, target, support), k).values.mean())
                     for target in targets])


def reference_auroc(normality: np.ndarray, labels: np.ndarray, known_classes: int) -> float:
    """AUROC, known classes positive."""
    return float(roc_auc_score(labels < known_classes, normality))


def reference_fpr95(normality: np.ndarray, labels: np.ndarray, known_classes: int) -> float:
    """FPR at the threshold whose recall is nearest 95%, scanning thresholds upwards."""
    known = normality[labels < known_classes]
    unknown = normality[labels >= known_classes]
    best_gap, best_fpr = None, None
    for threshold in np.unique(normality[normality >= known.min()]):  # ascending
        recall = np.count_nonzero(known >= threshold) / known.size
        gap = abs(recall - 0.95)
        if best_gap is None or gap < best_gap:
            best_gap, best_fpr = gap, np.count_nonzero(unknown >= threshold) / unknown.size
    return float(best_fpr)
