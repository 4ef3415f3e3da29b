"""End-to-end `train.py --only_eval` on a generated PACS-like tree with a random checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

import train
from datasets.benchmarks import get_eval_split
from models.checkpoint import CheckpointError, load_model_folder
from tests.conftest import save_informative_checkpoint
from tests.authors_reference import (reference_auroc, reference_features, reference_fpr95, reference_knn,
                                     reference_most_significant, reference_resend)

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


@pytest.fixture
def pacs_root(image_tree, tmp_path):
    """Every PACS domain/class folder with 2 tiny images (3 for art_painting, the scored domain)."""
    layout = {f"PACS/kfold/{d}/{c}": (3 if d == "art_painting" else 2) for d in DOMAINS for c in PACS_CLASSES}
    return image_tree(layout, root=tmp_path / "data", size=20)


def checkpoint_for(pacs_root, folder, n_outputs=1):
    """A checkpoint (2 relational blocks) whose head is refitted on ArtPainting's support pairs."""
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    return save_informative_checkpoint(folder, split.support, 32, n_outputs=n_outputs)


@pytest.fixture
def random_checkpoint(pacs_root, tmp_path):
    """An L2-head checkpoint whose scores vary on this tree (see tests/conftest.py)."""
    return checkpoint_for(pacs_root, tmp_path / "ckpt")


def run(argv):
    """Parse and run train.py in this process."""
    args = train.get_args_parser().parse_args(argv)
    train.main(args)
    return args


def eval_argv(root, ckpt, *extra):
    return ["--only_eval", "--dataset", "PACS_DG", "--data_root", str(root),
            "--checkpoint_folder_path", str(ckpt), "--image_size", "32", "--num_workers", "0",
            "--device", "cpu", "--eval_batch_size", "5", *extra]


def test_only_eval_writes_json_csv_and_tensorboard(pacs_root, random_checkpoint, capsys):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "ArtPainting"))
    out = capsys.readouterr().out
    assert "ArtPainting" in out and "auroc" in out
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_ArtPainting.json").read_text())
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc", "n_known", "n_unknown", "settings"):
        assert key in record
    assert record["n_known"] == 18 and record["n_unknown"] == 3
    assert record["settings"]["iteration"] == 7 and record["settings"]["objective"] == "L2"
    rows = (random_checkpoint / "eval" / "PACS_DG_ArtPainting_scores.csv").read_text().strip().splitlines()
    assert rows[0] == "path,label,known,normality,pred" and len(rows) == 1 + 21
    assert any(name.startswith("events") for name in os.listdir(random_checkpoint / "tensorboard"))


VARIANT_FLAGS = {"resend": [], "resend_msp": ["--most_significant_prototypes", "--NNK", "2"],
                 "resend_knn": ["--knn_distance_evaluator", "--NNK", "3"]}


@pytest.mark.parametrize("n_outputs", [1, 2], ids=["L2_head", "CE_head"])
@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_only_eval_gives_the_authors_scores(pacs_root, tmp_path, variant, n_outputs):
    """Batched --only_eval against the authors' algorithm written one image at a time."""
    ckpt = checkpoint_for(pacs_root, tmp_path / "ckpt", n_outputs)
    run(eval_argv(pacs_root, ckpt, "--target", "ArtPainting", *VARIANT_FLAGS[variant]))
    stem = "PACS_DG_ArtPainting" + ("" if variant == "resend" else f"_{variant}")
    record = json.loads((ckpt / "eval" / f"{stem}.json").read_text())
    rows = [line.split(",") for line in (ckpt / "eval" / f"{stem}_scores.csv").read_text().strip().splitlines()[1:]]
    normality = np.array([float(row[3]) for row in rows])
    preds = np.array([int(row[4]) for row in rows])

    model = load_model_folder(str(ckpt))
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    support = reference_features(model.backbone, [path for path, _ in split.support], 32)
    scored = reference_features(model.backbone, [path for path, _ in split.scored], 32)
    support_labels = [label for _, label in split.support]
    labels = np.array([label for _, label in split.scored])
    extra = {}
    if variant == "resend":
        expected, expected_preds = reference_resend(model.relational, support, support_labels, scored, 6)
    elif variant == "resend_msp":
        msp = reference_most_significant(model.relational, support, support_labels, scored, 6, k=2)
        expected, expected_preds = msp["max_logit"], msp["pred"]
        extra["max_softmax"] = msp["max_softmax"]
    else:
        expected, expected_preds = reference_knn(model.relational, support, scored, k=3), None

    # The fixture must make the comparison informative: scores spread (1000x the tolerance on
    # them), several predicted classes.
    assert np.ptp(expected) > 0.1, np.ptp(expected)
    if expected_preds is not None:
        assert len(set(expected_preds.tolist())) >= 2
        assert np.array_equal(preds, expected_preds)
    # Batching, channels_last and the folded BatchNorm change features by float rounding (~1e-6
    # relative), which the refitted head carries into the logits at ~1e-5 of their scale.
    np.testing.assert_allclose(normality, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert record["auroc"] == pytest.approx(reference_auroc(expected, labels, 6), abs=1e-6)
    assert record["fpr95"] == pytest.approx(reference_fpr95(expected, labels, 6), abs=1e-6)
    for key, values in extra.items():
        assert record["extra_metrics"][key]["auroc"] == pytest.approx(reference_auroc(values, labels, 6), abs=1e-6)
        assert record["extra_metrics"][key]["fpr95"] == pytest.approx(reference_fpr95(values, labels, 6), abs=1e-6)


def test_scores_are_not_the_squashed_output(pacs_root, random_checkpoint):
    """On this fixture the squashed e*sigmoid(c*x) - e/2 scoring gives another AUROC than the authors'."""
    run(eval_argv(pacs_root, random_checkpoint, "--target", "ArtPainting"))
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_ArtPainting.json").read_text())
    model = load_model_folder(str(random_checkpoint))
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    support = reference_features(model.backbone, [path for path, _ in split.support], 32)
    scored = reference_features(model.backbone, [path for path, _ in split.scored], 32)
    labels = np.array([label for _, label in split.scored])
    support_labels = torch.tensor([label for _, label in split.support])
    prototypes = torch.stack([support[support_labels == c].mean(0) for c in range(6)])
    with torch.no_grad():
        squashed = [torch.softmax(-(2 * torch.sigmoid(10 * model.relational(t.expand(6, -1), prototypes)[:, 0]) - 1),
                                  dim=0).max().item() for t in scored]
    assert abs(reference_auroc(np.array(squashed), labels, 6) - record["auroc"]) > 0.05


def test_target_all_prints_every_target_and_average(pacs_root, random_checkpoint, capsys):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "all"))
    out = capsys.readouterr().out
    for target in ("ArtPainting", "Cartoon", "Photo", "Sketch", "average"):
        assert target in out
    summary = json.loads((random_checkpoint / "eval" / "PACS_DG_summary.json").read_text())
    (row,) = summary["auroc"]
    assert row["method"] == "resend"
    assert set(row) == {"method", "ArtPainting", "Cartoon", "Photo", "Sketch", "average"}
    assert row["average"] == pytest.approx(np.mean([row[t] for t in ("ArtPainting", "Cartoon", "Photo", "Sketch")]))


def test_variant_files_and_few_shot(pacs_root, random_checkpoint):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--most_significant_prototypes",
                  "--NNK", "2"))
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_Photo_resend_msp.json").read_text())
    assert set(record["extra_metrics"]) == {"max_softmax"}
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--knn_distance_evaluator", "--NNK", "2"))
    assert json.loads((random_checkpoint / "eval" / "PACS_DG_Photo_resend_knn.json").read_text())["settings"]["NNK"] == 2
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--few_shot", "1", "--seed", "3"))
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_Photo.json").read_text())
    assert record["n_support"] == 6 and record["settings"]["few_shot"] == 1


def test_bad_inputs_fail_before_writing(tmp_path, pacs_root, random_checkpoint):
    with pytest.raises(Exception, match="PACS"):
        run(eval_argv(tmp_path / "nowhere", random_checkpoint, "--target", "ArtPainting"))
    with pytest.raises(Exception, match="ArtPainting"):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "Painting"))
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="cls_rel.pkl"):
        run(eval_argv(pacs_root, empty, "--target", "ArtPainting"))
    # A corrupt image is named, and nothing is written.
    bad = pacs_root / "PACS/kfold/art_painting/dog/img_000.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="img_000.jpg"):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "ArtPainting"))
    assert not (random_checkpoint / "eval").exists()


def test_all_targets_all_evaluators_one_table(pacs_root, random_checkpoint, capsys):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "all", "--evaluator", "all"))
    out = capsys.readouterr().out
    from evaluation.scorers import SCORERS
    for name in SCORERS:
        assert name in out
    summary = json.loads((random_checkpoint / "eval" / "PACS_DG_summary.json").read_text())
    assert [row["method"] for row in summary["fpr95"]] == list(SCORERS)
    assert all(set(row) == {"method", "ArtPainting", "Cartoon", "Photo", "Sketch", "average"}
               for row in summary["auroc"])
    csv_rows = (random_checkpoint / "eval" / "PACS_DG_summary.csv").read_text().splitlines()
    assert csv_rows[0] == "metric,method,ArtPainting,Cartoon,Photo,Sketch,average"
    assert len(csv_rows) == 1 + 5 * len(SCORERS)
    # Every method also has its own per-target files.
    assert (random_checkpoint / "eval" / "PACS_DG_Sketch_mahalanobis.json").exists()
    assert (random_checkpoint / "eval" / "PACS_DG_Sketch_featurenorm_scores.csv").exists()


def test_backbone_only_runs_baselines_without_checkpoint(pacs_root, tmp_path, capsys):
    out_dir = tmp_path / "backbone_eval"
    run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--backbone_only", "--backbone_weights", "none",
                  "--evaluator", "all"))
    out = capsys.readouterr().out
    assert "prototype_cosine" in out and "resend" not in out.replace("results written", "")
    record = json.loads((out_dir / "eval" / "PACS_DG_Cartoon_knn.json").read_text())
    assert record["settings"]["backbone_weights"] == "none"
    with pytest.raises(ValueError, match="relational module"):
        run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--backbone_only", "--backbone_weights", "none",
                      "--evaluator", "resend"))
    with pytest.raises(ValueError, match="unknown --evaluator"):
        run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--evaluator", "magic"))
