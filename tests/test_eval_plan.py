"""The evaluation engine's plan -> extract -> score steps, the FitCache an evaluation owns, the fit thread
count a scorer declares, and the truncated-image policy threaded from the flag to every dataset."""
import dataclasses
import re

import numpy as np
import pytest
import torch

import train
from datasets.image_lists import DataError
from evaluation.evaluate import EvalSettings, build_scorers, evaluate_splits, load_splits, plan_features
from evaluation.scorers import SCORERS, FeatureBatch, FitCache, Scorer, ScoringInputs, fit_scorer
from evaluation.settings import eval_settings, scorer_names
from models.backbone import ResNetBackbone

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
CPU = torch.device("cpu")


@pytest.fixture
def pacs_root(image_tree, tmp_path):
    """Every PACS domain/class folder with 2 tiny images."""
    return image_tree({f"PACS/kfold/{d}/{c}": 2 for d in PACS_DOMAINS for c in PACS_CLASSES},
                      root=tmp_path / "data", size=36)


def test_the_plan_sends_each_image_through_the_backbone_once_per_transform(pacs_root):
    splits = load_splits("PACS_DG", "all", str(pacs_root))
    settings = EvalSettings(scorers=("knn", "featurenorm"), image_size=32, num_workers=0)
    plan = plan_features(splits, build_scorers(splits, None, settings), settings)
    every_support = {path for split in splits for path, _ in split.support}
    every_scored = {path for split in splits for path, _ in split.scored}
    assert sorted(plan.scored) == sorted(every_scored) and len(plan.scored) == len(set(plan.scored))
    assert set(plan.support_only) == every_support - every_scored
    assert plan.plain == plan.support_only + plan.scored
    assert sorted(plan.jigsawed) == sorted(every_support) and plan.needs_norms and not plan.needs_maps
    assert [len(support) for support in plan.supports] == [len(split.support) for split in splits]
    no_norms = plan_features(splits, build_scorers(splits, None, EvalSettings(scorers=("knn",))), settings)
    assert no_norms.jigsawed == [] and not no_norms.needs_norms


def test_evaluator_all_fits_the_lbfgs_probe_once_per_support_set(pacs_root, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    fitted_on = []
    original_fit = LogisticRegression.fit

    def counting_fit(self, X, y, *args, **kwargs):
        if self.solver == "lbfgs":
            fitted_on.append(X.shape)
        return original_fit(self, X, y, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", counting_fit)
    args = train.parse_command_line(["--only_eval", "--backbone_only", "--evaluator", "all", "--image_size", "32",
                                     "--num_workers", "0"])
    names = scorer_names(args)
    assert {"linear_probe", "energy", "max_logit", "react", "ash_b"} <= set(names)
    splits = load_splits("PACS_DG", "Photo", str(pacs_root)) + load_splits("PACS_DG", "Sketch", str(pacs_root))
    settings = EvalSettings(scorers=names, image_size=32, num_workers=0, scorer_options={"flow_epochs": 1})
    torch.manual_seed(0)
    results = evaluate_splits(splits, ResNetBackbone("resnet18", weights=None), None, settings, CPU)
    assert len(results) == 2 * len(names)
    # Two support sets (each split's), one lbfgs fit each, for the five scorers that read the probe.
    assert fitted_on == [(len(splits[0].support), 512), (len(splits[1].support), 512)]
    # The cache belongs to that evaluation: another one fits its own probe again.
    evaluate_splits(splits[:1], ResNetBackbone("resnet18", weights=None), None,
                    EvalSettings(scorers=("linear_probe", "energy"), image_size=32, num_workers=0), CPU)
    assert len(fitted_on) == 3


class _ThreadProbe(Scorer):
    """Records the intra-op thread count its fit ran with."""

    fit_threads = 1
    seen: list = []

    def fit(self, inputs):
        self.seen.append(torch.get_num_threads())
        if inputs.support.labels is None:
            raise RuntimeError("fit failed")


def test_fit_scorer_applies_the_declared_thread_count_and_restores_it():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe = _ThreadProbe()
        fit_scorer(probe, ScoringInputs(FeatureBatch(torch.zeros(2, 3), torch.tensor([0, 1]))))
        assert probe.seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="fit failed"):  # restored after a failed fit too
            fit_scorer(probe, ScoringInputs(FeatureBatch(torch.zeros(2, 3))))
        assert torch.get_num_threads() == 2
        probe.fit_threads = None  # the process's count
        fit_scorer(probe, ScoringInputs(FeatureBatch(torch.zeros(2, 3), torch.tensor([0, 1]))))
        assert probe.seen == [1, 1, 2]
    finally:
        torch.set_num_threads(previous)
    # The scorers that train small heads declare one thread; the others keep the process's.
    assert {name for name, cls in SCORERS.items() if cls.fit_threads is not None} == {"flow", "latent_vae"}
    assert SCORERS["flow"].fit_threads == SCORERS["latent_vae"].fit_threads == 1


def test_fit_cache_fits_once_per_key():
    fits = FitCache()
    made = []
    assert fits.get(("a", 1), lambda: made.append("a") or "A") == "A"
    assert fits.get(("a", 1), lambda: made.append("again") or "B") == "A"
    assert fits.get(("a", 2), lambda: made.append("a2") or "C") == "C"
    assert made == ["a", "a2"] and fits.fits == 2


# ------------------------------------------------------------------- --load_truncated_images, flag to datasets

def truncate(path):
    """Cut a JPEG of noise (rewritten so that enough image data is lost) at 60 %."""
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def test_evaluation_reads_truncated_images_only_under_the_flag(pacs_root):
    cut = truncate(pacs_root / "PACS/kfold/photo/dog/img_000.jpg")
    splits = load_splits("PACS_DG", "Photo", str(pacs_root))
    backbone = ResNetBackbone("resnet18", weights=None)
    args = train.parse_command_line(["--only_eval", "--backbone_only", "--evaluator", "prototype_cosine",
                                     "--image_size", "32", "--num_workers", "0", "--load_truncated_images"])
    settings = eval_settings(args)
    assert settings.load_truncated_images is True
    with pytest.warns(UserWarning, match=re.escape(f"{cut} is truncated")):
        (result,) = evaluate_splits(splits, backbone, None, settings, CPU)
    assert str(cut) in result.paths
    args = train.parse_command_line(["--only_eval", "--backbone_only", "--evaluator", "prototype_cosine",
                                     "--image_size", "32", "--num_workers", "0"])
    with pytest.raises(DataError, match=re.escape(f"cannot read image {cut}: image file is truncated")):
        evaluate_splits(splits, backbone, None, eval_settings(args), CPU)


def test_training_settings_carry_the_flag_to_the_pair_datasets(image_tree, tmp_path):
    from training.main import build_pair_stream
    from training.settings import TrainingSettings

    root = image_tree({"a": 3, "b": 3}, root=tmp_path / "train", size=20)
    for flags, expected in (([], False), (["--load_truncated_images"], True)):
        args = train.parse_command_line(["--dataset", "Folder", "--train_dir", str(root), "--checkpoint_folder_path",
                                         str(tmp_path / "out"), "--num_workers", "0", "--batch_size", "2", *flags])
        args.device, args.distributed, args.world_size = CPU, False, 1
        settings = TrainingSettings.from_args(args)
        assert settings.data.load_truncated_images is expected
        assert settings.evaluation.scoring.load_truncated_images is expected
        samples = [(str(path), int(path.parent.name == "b")) for path in sorted(root.rglob("*.jpg"))]
        for on_device in (False, True):
            augmentation = dataclasses.replace(settings.augmentation, on_device=on_device)
            stream = build_pair_stream(samples, settings.data, augmentation, CPU)
            dataset = stream._loader(0, 0).dataset.dataset  # SeededItems -> the pass's pair dataset
            pairs = dataset.pairs if on_device else dataset
            assert pairs.load_truncated is expected


def test_device_augment_reads_truncated_bytes_only_under_the_flag(tmp_path):
    from datasets.augment import read_image_bytes

    cut = truncate(tmp_path / "cut.jpg")
    assert read_image_bytes(str(cut), load_truncated=True) == cut.read_bytes()
    with pytest.raises(DataError, match=re.escape(f"cannot read image {cut}: image file is truncated")):
        read_image_bytes(str(cut))


def test_the_api_reads_truncated_images_only_when_asked(tmp_path):
    from evaluation.api import NoveltyDetector
    from models.checkpoint import LoadedModel
    from models.relational import RelationalTransformer

    cut = truncate(tmp_path / "cut.jpg")
    torch.manual_seed(0)
    model = LoadedModel(ResNetBackbone("resnet18", weights=None), RelationalTransformer(feat_dim=512, depth=1),
                        network="resnet18", objective="L2", iteration=None, folder=str(tmp_path), source=str(tmp_path))
    with pytest.warns(UserWarning, match=re.escape(f"{cut} is truncated")):
        feats = NoveltyDetector(model, image_size=32, load_truncated_images=True).features([str(cut)])
    assert feats.shape == (1, 512)
    with pytest.raises(DataError, match=re.escape(f"cannot read image {cut}: image file is truncated")):
        NoveltyDetector(model, image_size=32).features([str(cut)])


def test_a_map_figure_draws_a_scored_truncated_image_as_it_was_scored(tmp_path):
    """Only scored images are drawn: a truncated one was scored under --load_truncated_images, so it is drawn."""
    from evaluation.map_figures import plot_novelty_maps

    cut = truncate(tmp_path / "cut.jpg")
    result = type("R", (), dict(dataset="D", target="T", scorer="prototype_map", normality=np.array([0.2]),
                                labels=np.array([0]), known_classes=1, paths=[str(cut)], maps=np.zeros((1, 2, 2))))
    with pytest.warns(UserWarning, match=re.escape(f"{cut} is truncated")):
        plot_novelty_maps(result, 1, str(tmp_path / "maps.png"))
    assert (tmp_path / "maps.png").stat().st_size > 1000
