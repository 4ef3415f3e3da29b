"""End-to-end `train.py --only_eval` on a generated PACS-like tree with a random checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

import train
from datasets.benchmarks import get_eval_split
from evaluation.metrics import compute_metrics
from models.backbone import ResNetBackbone
from models.checkpoint import CheckpointError, save_model_folder
from models.relational import RelationalTransformer
from tests.naive_resend import naive_resend_scores

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


@pytest.fixture
def pacs_root(image_tree, tmp_path):
    """Every PACS domain/class folder with 2 tiny images (3 for art_painting, the scored domain)."""
    layout = {f"PACS/kfold/{d}/{c}": (3 if d == "art_painting" else 2) for d in DOMAINS for c in PACS_CLASSES}
    return image_tree(layout, root=tmp_path / "data", size=20)


@pytest.fixture
def random_checkpoint(tmp_path):
    """A checkpoint folder with random weights (2 relational blocks to stay quick)."""
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    backbone = ResNetBackbone("resnet18", weights=None)
    relational = RelationalTransformer(feat_dim=512, n_outputs=1, depth=2)
    save_model_folder(str(folder), backbone, relational, iteration=7)
    return folder


def run(argv):
    """Parse and run train.py in this process."""
    args = train.get_args_parser().parse_args(argv)
    train.main(args)
    return args


def eval_argv(root, ckpt, *extra):
    return ["--only_eval", "--dataset", "PACS_DG", "--data_root", str(root),
            "--checkpoint_folder_path", str(ckpt), "--image_size", "32", "--num_workers", "0",
            "--device", "cpu", "--eval_batch_size", "5", *extra]


def test_only_eval_writes_json_csv_tensorboard_and_matches_naive_algorithm(pacs_root, random_checkpoint, capsys):
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

    # The batched, chunked pipeline gives the numbers of the naive per-image loop.
    from models.checkpoint import load_model_folder
    model = load_model_folder(str(random_checkpoint))
    model.backbone.eval(), model.relational.eval()
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    scores, preds = naive_resend_scores(model.backbone, model.relational, split.support,
                                        [path for path, _ in split.scored], split.known_classes, 32)
    labels = np.array([label for _, label in split.scored])
    expected = compute_metrics(scores, labels, preds, 6)
    assert record["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    assert record["fpr95"] == pytest.approx(expected["fpr95"], abs=1e-6)
    csv_scores = np.array([float(r.split(",")[3]) for r in rows[1:]])
    np.testing.assert_allclose(csv_scores, scores, atol=1e-5)


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


def test_variants_run(pacs_root, random_checkpoint):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--most_significant_prototypes",
                  "--NNK", "2"))
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_Photo_resend_msp.json").read_text())
    assert "max_logit" in record["extra_metrics"]
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--knn_distance_evaluator", "--NNK", "2"))
    assert (random_checkpoint / "eval" / "PACS_DG_Photo_resend_knn.json").exists()
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--few_shot", "1", "--seed", "3"))
    record = json.loads((random_checkpoint / "eval" / "PACS_DG_Photo.json").read_text())
    assert record["n_support"] == 6 and record["settings"]["few_shot"] == 1


def test_warns_when_scored_with_other_sigmoid_settings_than_trained(pacs_root, random_checkpoint, capsys):
    # A run folder of this project records the training flags; c and e shape every score.
    (random_checkpoint / "args.json").write_text(json.dumps({"sigmoid_compression": 1.0,
                                                              "sigmoid_expansion": 2.0}))
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo"))
    out = capsys.readouterr().out
    assert "trained with --sigmoid_compression 1.0 but is scored with --sigmoid_compression 10.0" in out
    assert "sigmoid_expansion" not in out
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--sigmoid_compression", "1"))
    assert "warning" not in capsys.readouterr().out
    (random_checkpoint / "args.json").write_text("{not json")
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo"))
    assert f"cannot read {random_checkpoint / 'args.json'} to check the sigmoid settings" in capsys.readouterr().out


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
