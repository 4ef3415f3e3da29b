"""Every registered scorer behind one interface; a new scorer is one class, reached by the whole program."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import train
from evaluation.metrics import auroc
from evaluation.scorers import (SCORERS, FeatureBatch, Scorer, ScoreResult, ScoringInputs, build_scorer,
                                hyperparameter, register_scorer, scorer_flags)
from evaluation.scorers.base import fitted
from utils.arg_types import positive_float


def separable_problem(seed=0, dim=16, n_classes=3, n_support=10, n_scored=12, spread=False):
    """Known classes on distinct axes; the unknowns at their centroid, equally far from every class (so a
    classifier is unsure there too); block norms that tell known from unknown at one block.

    `spread`: post-ReLU features whose class evidence covers a third of the units (what a pooled backbone
    feature looks like), for the scorers that clip or prune activations (ReAct, ASH), which a class
    carried by one unit defeats by design."""
    g = torch.Generator().manual_seed(seed)
    if spread:
        centres = 4.0 * (torch.arange(dim)[None, :] % n_classes == torch.arange(n_classes)[:, None]).float()
    else:
        centres = 12.0 * torch.eye(dim)[:n_classes]
    activation = torch.relu if spread else (lambda x: x)
    support_labels = torch.arange(n_classes).repeat_interleave(n_support)
    support = activation(centres[support_labels] + torch.randn(len(support_labels), dim, generator=g))
    known_labels = torch.arange(n_classes).repeat_interleave(n_scored)
    known = activation(centres[known_labels] + torch.randn(len(known_labels), dim, generator=g))
    unknown = activation(centres.mean(0) + torch.randn(n_scored, dim, generator=g))
    scored = torch.cat([known, unknown])
    is_known = np.r_[np.ones(len(known), bool), np.zeros(n_scored, bool)]
    norms = lambda rows, boost: 1.0 + 0.1 * torch.rand(rows, 4, generator=g) + boost  # noqa: E731
    support_norms = norms(len(support), torch.tensor([0.0, 0.0, 2.0, 0.0]))
    scored_norms = norms(len(scored), torch.from_numpy(is_known).float()[:, None] * torch.tensor([0.0, 0.0, 2.0, 0.0]))
    inputs = ScoringInputs(
        support=FeatureBatch(support, support_labels, support_norms),
        jigsaw=FeatureBatch(support, block_norms=norms(len(support), torch.zeros(4))),
        # An L2 head whose raw logit is the Euclidean distance: -logit is a similarity.
        pair_logits=lambda a, b: torch.linalg.vector_norm(a - b, dim=1, keepdim=True),
        pair_chunk=50)
    return inputs, FeatureBatch(scored, block_norms=scored_norms), is_known, known_labels


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_registered_scorer_detects_a_separated_unknown_cluster(name):
    inputs, scored, is_known, known_labels = separable_problem(spread=SCORERS[name].shapes_activations)
    scorer = build_scorer(name, {"NNK": 3})
    scorer.fit(inputs)
    result = scorer.score(scored)
    assert isinstance(result, ScoreResult) and result.normality.shape == (len(is_known),)
    assert torch.isfinite(result.normality).all()
    assert auroc(result.normality.numpy().astype(np.float64), is_known) > 0.95
    if result.pred is not None:
        assert torch.equal(result.pred[:len(known_labels)], known_labels)


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_scorer_declares_its_summary_and_hyperparameter_flags(name):
    cls = SCORERS[name]
    assert cls.name == name and len(cls.summary) > 10
    parser_flags = {action.dest for action in train.get_args_parser()._actions}
    for flag, entry in scorer_flags().items():
        assert flag in parser_flags
        assert train.get_args_parser().parse_args([]).__dict__[flag] == entry["default"]


@dataclass
class ToyMarginScorer(Scorer):
    """A throwaway post-hoc scorer: minus the distance to the nearest class mean, minus a margin."""

    margin: float = hyperparameter(0.0, "toy margin subtracted from every score", flag="toy_margin",
                                   arg_type=positive_float)
    means: torch.Tensor = fitted()

    def fit(self, inputs: ScoringInputs) -> None:
        labels = inputs.support.labels
        self.means = torch.stack([inputs.support.feats[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    def score(self, scored: FeatureBatch) -> ScoreResult:
        distances = torch.cdist(scored.feats, self.means)
        nearest, pred = distances.min(dim=1)
        return ScoreResult(normality=-nearest - self.margin, pred=pred)


@pytest.fixture
def toy_scorer():
    """ToyMarginScorer registered for one test, removed afterwards."""
    register_scorer("toy_margin", "a test's throwaway scorer")(ToyMarginScorer)
    try:
        yield ToyMarginScorer
    finally:
        SCORERS.pop("toy_margin")


def test_a_registered_scorer_reaches_the_command_line_and_the_results(toy_scorer, image_tree, tmp_path, capsys):
    root = image_tree({f"PACS/kfold/{d}/{c}": 2 for d in ("art_painting", "cartoon", "photo", "sketch")
                       for c in ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")},
                      root=tmp_path / "data", size=20)
    out = tmp_path / "baselines"
    argv = ["--only_eval", "--dataset", "PACS_DG", "--target", "Photo", "--data_root", str(root),
            "--checkpoint_folder_path", str(out), "--backbone_only", "--backbone_weights", "none",
            "--image_size", "32", "--device", "cpu", "--evaluator", "toy_margin,prototype_distance",
            "--toy_margin", "2.5"]
    assert train.run_command_line(argv) == 0
    assert "toy_margin" in capsys.readouterr().out
    (group,) = [p for p in (out / "eval").iterdir() if p.is_dir()]
    toy = json.loads((group / "PACS_DG_Photo_toy_margin.json").read_text())
    distance = json.loads((group / "PACS_DG_Photo_prototype_distance.json").read_text())
    # The same ranking as prototype_distance, shifted by the flag's value, which the record keeps.
    assert toy["auroc"] == pytest.approx(distance["auroc"]) and toy["settings"]["toy_margin"] == 2.5
    toy_scores = [float(line.split(",")[3]) for line in (group / "PACS_DG_Photo_toy_margin_scores.csv").read_text().splitlines()[1:]]
    distance_scores = [float(line.split(",")[3]) for line in
                       (group / "PACS_DG_Photo_prototype_distance_scores.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(np.array(toy_scores) + 2.5, distance_scores, rtol=1e-6)
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--toy_margin", "-1"])
