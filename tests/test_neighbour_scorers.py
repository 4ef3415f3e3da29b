"""The neighbouring methods beside ReSeND: energy, max_logit, react, ash_b (the linear-probe head), flow (a coupling
flow density), latent_vae (a VAE/metric latent head) and prototype_map (PAnS-style anomaly maps), with the
feature-map plumbing (backbone, extraction, engine), the anomaly-map figure and the Python API's maps."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from evaluation.map_figures import extreme_indices, map_figures, plot_novelty_maps
from evaluation.metrics import auroc
from evaluation.scorers import SCORERS, FeatureBatch, FitCache, ScoringInputs, build_scorer
from evaluation.scorers.classifier import ash_b, fit_linear_head
from evaluation.scorers.density import AffineCoupling, CouplingFlow
from evaluation.scorers.latent import balanced_batches
from evaluation.scorers.maps import novelty_maps
from models.backbone import ResNetBackbone

NEW_SCORERS = ("energy", "max_logit", "react", "ash_b", "flow", "latent_vae", "prototype_map")


def relu_problem(seed=0, dim=64, n_classes=4, n_support=40, n_known=25, n_unknown=25, side=3):
    """Post-ReLU-like features as a backbone's pooled activations: each class a random non-negative pattern over
    many units, the unknowns another class's pattern; feature maps whose spatial mean is the feature, with the
    unknowns' evidence concentrated in one region."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.relu(torch.randn(n_classes + 1, dim, generator=g)) * 2.0

    def draw(labels):
        return torch.relu(centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=g))

    support_labels = torch.arange(n_classes).repeat_interleave(n_support)
    scored_labels = torch.cat([torch.arange(n_classes).repeat_interleave(n_known // n_classes + 1)[:n_known],
                               torch.full((n_unknown,), n_classes)])
    scored = draw(scored_labels)
    wobble = 0.3 * torch.randn(len(scored), dim, side, side, generator=g)
    maps = torch.relu(scored[:, :, None, None] + wobble - wobble.mean(dim=(2, 3), keepdim=True))
    is_known = (scored_labels < n_classes).numpy()
    return (ScoringInputs(FeatureBatch(draw(support_labels), support_labels)),
            FeatureBatch(scored, feature_maps=maps), is_known, scored_labels[:n_known])


def fit_score(name, inputs, scored, **options):
    scorer = build_scorer(name, options)
    scorer.fit(inputs)
    return scorer, scorer.score(scored)


@pytest.mark.parametrize("name", NEW_SCORERS)
def test_separable_features_are_detected(name):
    inputs, scored, is_known, known_labels = relu_problem()
    _, result = fit_score(name, inputs, scored)
    assert result.normality.shape == (len(is_known),) and torch.isfinite(result.normality).all()
    assert auroc(result.normality.numpy().astype(np.float64), is_known) > 0.9
    accuracy = float((result.pred[:len(known_labels)] == known_labels).float().mean())
    assert accuracy >= 0.9


@pytest.mark.parametrize("name", NEW_SCORERS)
def test_degenerate_support_gives_a_clear_error_or_finite_scores(name):
    inputs, scored, _, _ = relu_problem(n_support=3)
    feats, labels = inputs.support.feats, inputs.support.labels
    one_class = ScoringInputs(FeatureBatch(feats[labels == 0], labels[labels == 0]))
    first = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(4)])
    one_per_class = ScoringInputs(FeatureBatch(feats[first], labels[first]))
    duplicated = ScoringInputs(FeatureBatch(feats.repeat(2, 1), labels.repeat(2)))
    identical = ScoringInputs(FeatureBatch(feats[:1].repeat(len(labels), 1), labels))
    for case, support in (("one class", one_class), ("one image per class", one_per_class),
                          ("duplicated features", duplicated), ("identical features", identical)):
        scorer = build_scorer(name)
        try:
            scorer.fit(support)
        except ValueError as error:
            # A clear error names what is missing.
            assert any(word in str(error) for word in ("class", "vary", "spread")), (case, str(error))
            continue
        result = scorer.score(scored)
        assert torch.isfinite(result.normality).all(), case


def test_logit_scorers_need_two_classes():
    inputs, _, _, _ = relu_problem()
    one_class = ScoringInputs(FeatureBatch(inputs.support.feats[:40], inputs.support.labels[:40]))
    for name in ("energy", "max_logit", "react", "ash_b"):
        with pytest.raises(ValueError, match="at least two support classes"):
            build_scorer(name).fit(one_class)


# ---------------------------------------------------------------------------------------- the classifier head

def test_folded_head_reproduces_the_linear_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    inputs, scored, _, _ = relu_problem()
    for n_classes in (2, 4):
        keep = inputs.support.labels < n_classes
        feats = inputs.support.feats[keep].double().numpy()
        labels = inputs.support.labels[keep].numpy()
        weight, bias = fit_linear_head(feats, labels, 1000, FitCache())
        scaler = StandardScaler().fit(feats)
        probe = LogisticRegression(solver="lbfgs", max_iter=1000).fit(scaler.transform(feats), labels)
        x = scored.feats.double().numpy()
        logits = x @ weight.T + bias
        softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
        softmax /= softmax.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(softmax, probe.predict_proba(scaler.transform(x)), atol=1e-8)
        if n_classes == 2:  # symmetric logits: energy and max logit do not favour class 1
            np.testing.assert_allclose(logits[:, 0], -logits[:, 1], atol=1e-10)


def test_energy_and_max_logit_read_the_head():
    inputs, scored, _, _ = relu_problem()
    energy, result = fit_score("energy", inputs, scored)
    logits = scored.feats.double() @ energy.weight.T + energy.bias
    np.testing.assert_allclose(result.normality.numpy(), torch.logsumexp(logits, dim=1).numpy(), rtol=1e-12)
    assert torch.equal(result.pred, logits.argmax(dim=1))
    _, result = fit_score("max_logit", inputs, scored)
    np.testing.assert_allclose(result.normality.numpy(), logits.max(dim=1).values.numpy(), rtol=1e-12)


def test_react_clips_at_the_percentile_of_all_support_activations():
    inputs, scored, _, _ = relu_problem()
    react, result = fit_score("react", inputs, scored, react_percentile=80.0)
    assert react.threshold == pytest.approx(np.percentile(inputs.support.feats.numpy().ravel(), 80))
    clipped = scored.feats.double().clamp(max=react.threshold)
    expected = torch.logsumexp(clipped @ react.weight.T + react.bias, dim=1)
    np.testing.assert_allclose(result.normality.numpy(), expected.numpy(), rtol=1e-12)


def test_ash_b_hand_example_with_ties():
    # k = 6 - round(6 * 0.5) = 3 kept: both 3s and, of the tied 1s, the first in column order; each kept
    # entry = sum / 3 = 3.
    x = torch.tensor([[3.0, 1.0, 0.0, 1.0, 1.0, 3.0]])
    assert ash_b(x, 50.0).tolist() == [[3.0, 3.0, 0.0, 0.0, 0.0, 3.0]]
    # The harness's count: 65 % of 512 activations pruned -> 512 - round(332.8) = 179 kept.
    out = ash_b(torch.rand(2, 512), 65.0)
    assert ((out > 0).sum(dim=1) == 179).all()
    with pytest.raises(ValueError, match="keeps none"):
        build_scorer("ash_b", {"ash_percentile": 99.0}).fit(
            ScoringInputs(FeatureBatch(torch.rand(6, 16), torch.tensor([0, 0, 1, 1, 2, 2]))))


def test_the_head_is_fitted_once_per_support_set():
    inputs, scored, _, _ = relu_problem()
    energy, _ = fit_score("energy", inputs, scored)
    ash, _ = fit_score("ash_b", inputs, scored)
    probe, _ = fit_score("linear_probe", inputs, scored)
    assert torch.equal(energy.weight, ash.weight) and inputs.fits.fits == 1
    # The fit belongs to the evaluation's FitCache, not to the module: another evaluation fits its own.
    other = ScoringInputs(inputs.support)
    fit_score("max_logit", other, scored)
    assert other.fits.fits == 1 and other.fits is not inputs.fits
    SCORERS["energy"](max_iter=50).fit(inputs)  # another max_iter is another probe
    assert inputs.fits.fits == 2


# ------------------------------------------------------------------------------------------------------ flow

def test_coupling_inverse_and_log_determinant():
    torch.manual_seed(0)
    coupling = AffineCoupling(6, torch.randperm(6), hidden=8).double()
    torch.nn.init.normal_(coupling.net[2].weight, std=0.5)  # away from the identity start
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        y, log_det = coupling(x)
        np.testing.assert_allclose(coupling.inverse(y).numpy(), x.numpy(), atol=1e-12)
    for row in range(5):
        jacobian = torch.autograd.functional.jacobian(lambda v: coupling(v[None])[0][0], x[row])
        assert float(torch.linalg.slogdet(jacobian)[1]) == pytest.approx(float(log_det[row]), abs=1e-10)
    flow = CouplingFlow(6, 3, 8, torch.Generator().manual_seed(1)).double()
    for layer in flow.couplings:
        torch.nn.init.normal_(layer.net[2].weight, std=0.5)
    with torch.no_grad():
        z, total = flow(x)
        np.testing.assert_allclose(flow.inverse(z).numpy(), x.numpy(), atol=1e-10)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[0])
    assert float(torch.linalg.slogdet(jacobian)[1]) == pytest.approx(float(total[0]), abs=1e-10)


def test_flow_density_integrates_to_one():
    # 2-d features: no residual, so exp(log p) over a fine grid must sum to ~1 (whitening, scales and
    # couplings all enter through their log-determinants). The couplings are perturbed away from the start.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(30)
    feats = torch.tensor([[0.0, 0.0], [3.0, 1.0]])[labels] + torch.randn(60, 2, generator=g) * torch.tensor([1.0, 0.4])
    scorer = build_scorer("flow", {"flow_epochs": 0})
    scorer.fit(ScoringInputs(FeatureBatch(feats, labels)))
    start, _ = scorer.log_likelihood(feats)
    torch.manual_seed(2)
    for layer in scorer.flow.couplings:
        torch.nn.init.normal_(layer.net[2].weight, std=0.05)
    assert float((scorer.log_likelihood(feats)[0] - start).abs().max()) > 0.05  # a flow that is not the start
    axis = torch.linspace(-8, 11, 700)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    log_p, _ = scorer.log_likelihood(grid)
    cell = float(axis[1] - axis[0]) ** 2
    assert float(torch.exp(log_p).sum() * cell) == pytest.approx(1.0, abs=1e-3)


def test_flow_keeps_the_start_when_training_does_not_generalise_and_is_deterministic():
    inputs, scored, _, _ = relu_problem()
    one, result_one = fit_score("flow", inputs, scored, flow_epochs=3)
    two, result_two = fit_score("flow", inputs, scored, flow_epochs=3)
    assert torch.equal(result_one.normality, result_two.normality)
    assert one.best_epoch == int(np.argmin(one.held_out)) and len(one.held_out) == 4
    # Too few support features to hold any out: the flow stays at its start, the Gaussian classifier.
    tiny = ScoringInputs(FeatureBatch(inputs.support.feats[::20], inputs.support.labels[::20]))
    scorer, _ = fit_score("flow", tiny, scored)
    assert scorer.best_epoch == 0 and scorer.losses == []


# ------------------------------------------------------------------------------------------------ latent_vae

def test_latent_vae_margin_schedule_and_determinism():
    inputs, scored, _, _ = relu_problem()
    options = {"vae_epochs": 6, "margins_epoch": 2, "margin_jump": 1.5, "margin_max_distance": 3.0}
    one, result_one = fit_score("latent_vae", inputs, scored, **options)
    _, result_two = fit_score("latent_vae", inputs, scored, **options)
    assert torch.equal(result_one.normality, result_two.normality)
    # Grows by 1.5 at the start of epochs 2 and 3; at epoch 4 it is 3.15 > 3.0 and stops: 0.15 + 3.0.
    assert one.final_margin == pytest.approx(0.15 + 2 * 1.5)
    assert one.latent_means.shape == (4, 32)


def test_latent_vae_reconstruction_weighting():
    inputs, scored, is_known, _ = relu_problem()
    scorer, result = fit_score("latent_vae", inputs, scored, ae_features=True)
    assert scorer.ae_components.shape == (64, 32)  # the bottleneck is at most half the feature size
    distance = -result.extra["latent_distance"]
    relative = scorer._reconstruction_error((scored.feats - scorer.mean) / scorer.std).double() / scorer.recon_scale
    np.testing.assert_allclose(result.normality.numpy(), (-distance * relative).numpy(), rtol=1e-6)
    assert auroc(result.normality.numpy(), is_known) > 0.9


def test_balanced_batches():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    batches = balanced_batches(labels, 3, batch_classes=2, sample_count=4, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 8  # ceil(20 / 8) = 3, raised to the minimum of 8
    for rows in batches:
        counts = torch.bincount(labels[rows], minlength=3)
        assert len(rows) == 8 and sorted(counts.tolist()) == [0, 4, 4]


def test_latent_vae_flags():
    parser = train.get_args_parser()
    args = parser.parse_args(["--latent_dim", "16", "--ae_features", "on", "--margins_epoch", "3"])
    assert (args.latent_dim, args.ae_features, args.margins_epoch) == (16, True, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--ae_features", "maybe"])


# --------------------------------------------------------------------------------------------- prototype maps

def test_novelty_map_hand_example():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    maps = torch.tensor([[[[2.0, 0.0], [1.0, 0.0]],      # channel 0 over a 2 x 2 map
                          [[0.0, 3.0], [1.0, 0.0]]]])    # channel 1
    novelty, cls = novelty_maps(maps, prototypes)
    # (2, 0) -> class 0, cos 1; (0, 3) -> class 1, cos 1; (1, 1) -> cos 0.707; (0, 0) -> no match: novelty 1.
    np.testing.assert_allclose(novelty[0].numpy(), [[0.0, 0.0], [1 - 2 ** -0.5, 1.0]], atol=1e-6)
    assert cls[0, 0].tolist() == [0, 1]
    scorer = build_scorer("prototype_map")
    scorer.fit(ScoringInputs(FeatureBatch(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))))
    result = scorer.score(FeatureBatch(maps.mean(dim=(2, 3)), feature_maps=maps))
    assert result.normality.tolist() == pytest.approx([0.0])  # the worst location matches nothing
    assert result.maps.shape == (1, 2, 2)
    mean = build_scorer("prototype_map", {"map_reduction": "mean"})
    mean.fit(ScoringInputs(FeatureBatch(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))))
    assert float(mean.score(FeatureBatch(maps.mean(dim=(2, 3)), feature_maps=maps)).normality) == pytest.approx(
        1 - float(novelty.mean()))


def test_without_feature_maps_prototype_map_is_prototype_cosine():
    inputs, scored, _, _ = relu_problem()
    pooled = FeatureBatch(scored.feats)
    _, mapped = fit_score("prototype_map", inputs, pooled)
    _, cosine = fit_score("prototype_cosine", inputs, pooled)
    np.testing.assert_allclose(mapped.normality.numpy(), cosine.normality.numpy(), atol=1e-6)
    assert torch.equal(mapped.pred, cosine.pred)


def test_backbone_returns_the_last_feature_map():
    backbone = ResNetBackbone("resnet18", weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        plain_norms = backbone(x, return_block_norms=True)
        with_map = backbone(x, return_feature_map=True)
        everything = backbone(x, return_block_norms=True, return_feature_map=True)
    assert isinstance(feats, torch.Tensor) and len(plain_norms) == 2 and len(with_map) == 2 and len(everything) == 3
    assert with_map[1].shape == (2, 512, 2, 2)
    torch.testing.assert_close(with_map[1].mean(dim=(2, 3)), feats)
    torch.testing.assert_close(everything[1], plain_norms[1])


def test_engine_hands_feature_maps_and_keeps_the_maps(image_tree, tmp_path):
    root = image_tree({f"PACS/kfold/{d}/{c}": 2 for d in ("art_painting", "cartoon", "photo", "sketch")
                       for c in ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")},
                      root=tmp_path / "data", size=40)
    from evaluation.evaluate import EvalSettings, evaluate_splits, load_splits

    splits = load_splits("PACS_DG", "Photo", str(root))
    backbone = ResNetBackbone("resnet18", weights=None)
    settings = EvalSettings(scorers=("prototype_map", "prototype_cosine"), image_size=64, batch_size=8, num_workers=0)
    mapped, cosine = evaluate_splits(splits, backbone, None, settings, torch.device("cpu"))
    assert mapped.maps.shape == (len(splits[0].scored), 2, 2) and cosine.maps is None
    # 2 x 2 maps: the worst location, not the pooled feature.
    assert not np.allclose(mapped.normality, cosine.normality)
    np.testing.assert_allclose(mapped.normality, 1 - mapped.maps.reshape(len(mapped.maps), -1).max(axis=1), atol=1e-6)
    written = [draw(str(tmp_path / "figures" / name)) for name, draw in map_figures([mapped, cosine], 2)]
    assert [p.split("/")[-1] for p in written] == ["maps_PACS_DG_Photo.png"]
    assert map_figures([mapped], 0) == []


def test_feature_maps_are_kept_only_for_the_parts_that_ask(image_tree, tmp_path):
    from datasets.transforms import eval_transform
    from evaluation.features import extract_image_features

    root = image_tree({"a": 3, "b": 4}, root=tmp_path / "img", size=40)
    first = [str(root / "a" / f"img_{i:03d}.jpg") for i in range(3)]
    second = [str(root / "b" / f"img_{i:03d}.jpg") for i in range(4)]
    backbone = ResNetBackbone("resnet18", weights=None).eval()
    parts = [(first, eval_transform(64)), (second, eval_transform(64))]
    # Batches of 3 mix the two parts: the selection is per image, not per batch.
    both = extract_image_features(backbone, parts, 3, 0, torch.device("cpu"), return_feature_maps=True)
    only_second = extract_image_features(backbone, parts, 3, 0, torch.device("cpu"), return_feature_maps=[False, True])
    assert only_second[0].feature_maps is None and only_second[1].feature_maps.shape == (4, 512, 2, 2)
    assert torch.equal(only_second[1].feature_maps, both[1].feature_maps)
    assert torch.equal(only_second[0].feats, both[0].feats) and torch.equal(only_second[1].feats, both[1].feats)
    torch.testing.assert_close(both[0].feature_maps.float().mean(dim=(2, 3)), both[0].feats, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="return_feature_maps has 1 flags for 2 parts"):
        extract_image_features(backbone, parts, 3, 0, torch.device("cpu"), return_feature_maps=[True])


def test_map_figure_picks_the_extremes(tmp_path, image_tree):
    root = image_tree({"a": 5}, root=tmp_path / "img", size=24)
    paths = [str(root / "a" / f"img_{i:03d}.jpg") for i in range(5)]
    normality = np.array([0.5, 0.1, 0.9, 0.1, 0.7])
    novel, normal = extreme_indices(normality, 2)
    assert novel.tolist() == [1, 3] and normal.tolist() == [2, 4]
    result = type("R", (), dict(dataset="D", target="T", scorer="prototype_map", normality=normality,
                                labels=np.array([0, 1, 0, 1, 0]), known_classes=1, paths=paths,
                                maps=np.random.default_rng(0).random((5, 7, 7))))
    path = plot_novelty_maps(result, 2, str(tmp_path / "maps.png"))
    assert (tmp_path / "maps.png").stat().st_size > 1000 and path.endswith("maps.png")
    with pytest.raises(ValueError, match="no novelty maps"):
        plot_novelty_maps(type("R", (), dict(dataset="D", target="T", scorer="knn", maps=None)), 2,
                          str(tmp_path / "x.png"))


def test_command_line_runs_the_new_scorers_with_the_oodbench_protocol(image_tree, tmp_path):
    root = image_tree({f"PACS/kfold/{d}/{c}": 2 for d in ("art_painting", "cartoon", "photo", "sketch")
                       for c in ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")},
                      root=tmp_path / "data", size=20)
    out = tmp_path / "baselines"
    argv = ["--only_eval", "--dataset", "PACS_DG", "--target", "Photo", "--data_root", str(root),
            "--checkpoint_folder_path", str(out), "--backbone_only", "--backbone_weights", "none",
            "--image_size", "32", "--device", "cpu", "--evaluator", ",".join(("knn", "mahalanobis") + NEW_SCORERS),
            "--baseline_protocol", "oodbench", "--knn_normalize", "off", "--save_maps", "2"]
    assert train.run_command_line(argv) == 0
    (group,) = [p for p in (out / "eval").iterdir() if p.is_dir()]
    # The anomaly-map figure is part of the result group, listed in its manifest, for prototype_map only.
    manifest = json.loads((group / "manifest.json").read_text())
    assert [name for name in manifest["files"] if name.startswith("maps_")] == ["maps_PACS_DG_Photo.png"]
    assert (group / "maps_PACS_DG_Photo.png").stat().st_size > 1000 and manifest["settings"]["save_maps"] == 2
    for name in ("knn", "mahalanobis") + NEW_SCORERS:
        record = json.loads((group / f"PACS_DG_Photo_{name}.json").read_text())
        assert 0 <= record["fpr95_interp"] <= 1 and record["settings"]["baseline_protocol"] == "oodbench"
    assert json.loads((group / "PACS_DG_Photo_knn.json").read_text())["settings"]["knn_normalize"] is False


def test_save_maps_without_a_scorer_that_maps_is_refused(tmp_path):
    argv = ["--only_eval", "--dataset", "PACS_DG", "--target", "Photo", "--data_root", str(tmp_path),
            "--checkpoint_folder_path", str(tmp_path / "out"), "--backbone_only", "--backbone_weights", "none",
            "--device", "cpu", "--evaluator", "knn", "--save_maps", "3"]
    with pytest.raises(ValueError, match=r"--save_maps 3 draws the anomaly maps of prototype_map: add it to "
                                         r"--evaluator \(now knn\)"):
        train.run_command_line([*argv, "--debug_errors"])
    assert not (tmp_path / "out").exists()


def test_every_new_scorer_is_registered_with_flags():
    assert set(NEW_SCORERS) <= set(SCORERS)
    parser_flags = {action.dest for action in train.get_args_parser()._actions}
    for flag in ("react_percentile", "ash_percentile", "flow_layers", "flow_hidden", "flow_dims", "flow_epochs",
                 "flow_lr", "latent_dim", "kl_coeff", "generation_epoch", "margin_jump", "margins_epoch",
                 "margin_max_distance", "batch_classes", "sample_count", "ae_features", "vae_epochs", "vae_lr",
                 "map_reduction", "save_maps", "baseline_protocol", "knn_normalize"):
        assert flag in parser_flags


# ------------------------------------------------------------------------------------------------ Python API

def test_api_returns_the_anomaly_map_of_any_image(image_tree, tmp_path):
    from evaluation.api import NoveltyDetector
    from tests.conftest import save_informative_checkpoint

    root = image_tree({"a": 3, "b": 3, "novel": 2}, root=tmp_path / "img", size=20)
    support = [str(root / c / f"img_{i:03d}.jpg") for c in ("a", "b") for i in range(2)]
    queries = [str(root / "a" / "img_002.jpg"), str(root / "novel" / "img_000.jpg")]
    folder = save_informative_checkpoint(tmp_path / "ckpt", list(zip(support, [0, 0, 1, 1])), 64)
    detector = NoveltyDetector.from_folder(str(folder), image_size=64, verbose=False)
    result = detector.anomaly_maps(queries, support=support, labels=[0, 0, 1, 1])
    assert result.maps.shape == (2, 2, 2) and torch.isfinite(result.normality).all()
    feats, maps = detector.features_and_maps(queries)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), feats, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prototypes"):
        detector.anomaly_maps(queries)
    with pytest.raises(ValueError, match="anomaly_maps: support images need their labels"):
        detector.anomaly_maps(queries, support=support)
    with pytest.raises(ValueError, match="4 support samples but 3 labels"):
        detector.anomaly_maps(queries, support=support, labels=[0, 0, 1])
    mapper = NoveltyDetector.from_folder(str(folder), image_size=64, verbose=False, scorer="prototype_map")
    mapper.fit(support, [0, 0, 1, 1])
    torch.testing.assert_close(mapper.anomaly_maps(queries).maps, result.maps)
    # score() of a prototype_map detector reads the images' maps too, not 1 x 1 maps of the pooled features.
    torch.testing.assert_close(mapper.score(queries).normality, result.normality)
    assert not torch.allclose(mapper.score(feats).normality, result.normality)
    expected = 1 - F.normalize(maps, dim=1).flatten(2).transpose(1, 2) @ mapper.scorer.prototypes.T
    torch.testing.assert_close(result.maps.flatten(1), expected.min(dim=2).values, rtol=1e-5, atol=1e-5)
