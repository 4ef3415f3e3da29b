"""End-to-end `train.py --only_eval` on a generated PACS-like tree with a random checkpoint."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datasets.benchmarks import get_eval_split
from evaluation.api import NoveltyDetector
from evaluation.groups import GroupError
from evaluation.settings import eval_settings
from evaluation.run_settings import RunSettingsError
from models.checkpoint import CheckpointError, load_model_folder
from tests.conftest import save_informative_checkpoint
from tests.authors_reference import (reference_auroc, reference_features, reference_fpr95, reference_knn,
                                     reference_most_significant, reference_resend)
from utils.run_args import RunArgsError

REPO = Path(__file__).resolve().parents[1]
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
    """Parse (recording the explicit flags, as the command line does) and run train.py in this process."""
    args = train.parse_command_line(argv)
    train.main(args)
    return args


def groups_of(folder):
    """The result groups under `<folder>/eval/` (complete ones: each has a manifest), by name."""
    eval_root = folder / "eval"
    return {path.name: path for path in eval_root.iterdir() if (path / "manifest.json").is_file()}


def only_group(folder):
    """The one result group of `folder`, checking that nothing else (temp folders, loose files) is in eval/."""
    (group,) = groups_of(folder).values()
    assert sorted(os.listdir(folder / "eval")) == [group.name]
    return group


def eval_argv(root, ckpt, *extra, image_size="32"):
    """--only_eval on the PACS-like tree; image_size=None leaves --image_size out (the run's is used)."""
    size = [] if image_size is None else ["--image_size", image_size]
    return ["--only_eval", "--dataset", "PACS_DG", "--data_root", str(root),
            "--checkpoint_folder_path", str(ckpt), *size, "--num_workers", "0",
            "--device", "cpu", "--eval_batch_size", "5", *extra]


def test_only_eval_writes_json_csv_and_tensorboard(pacs_root, random_checkpoint, capsys):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "ArtPainting"))
    out = capsys.readouterr().out
    assert "ArtPainting" in out and "auroc" in out
    group = only_group(random_checkpoint)
    record = json.loads((group / "PACS_DG_ArtPainting_resend.json").read_text())
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc", "n_known", "n_unknown", "settings"):
        assert key in record
    assert record["n_known"] == 18 and record["n_unknown"] == 3
    assert record["settings"]["iteration"] == 7 and record["settings"]["objective"] == "L2"
    rows = (group / "PACS_DG_ArtPainting_resend_scores.csv").read_text().strip().splitlines()
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
    stem = f"PACS_DG_ArtPainting_{variant}"
    group = only_group(ckpt)
    record = json.loads((group / f"{stem}.json").read_text())
    rows = [line.split(",") for line in (group / f"{stem}_scores.csv").read_text().strip().splitlines()[1:]]
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
    record = json.loads((only_group(random_checkpoint) / "PACS_DG_ArtPainting_resend.json").read_text())
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
    summary = json.loads((only_group(random_checkpoint) / "PACS_DG_summary.json").read_text())
    (row,) = summary["auroc"]
    assert row["method"] == "resend"
    assert set(row) == {"method", "ArtPainting", "Cartoon", "Photo", "Sketch", "average"}
    assert row["average"] == pytest.approx(np.mean([row[t] for t in ("ArtPainting", "Cartoon", "Photo", "Sketch")]))


def test_variant_files_and_few_shot(pacs_root, random_checkpoint):
    def new_group(before):
        (name,) = set(groups_of(random_checkpoint)) - set(before)
        return groups_of(random_checkpoint)[name]

    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--most_significant_prototypes",
                  "--NNK", "2"))
    msp = only_group(random_checkpoint)
    record = json.loads((msp / "PACS_DG_Photo_resend_msp.json").read_text())
    assert set(record["extra_metrics"]) == {"max_softmax"}
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--knn_distance_evaluator", "--NNK", "2"))
    knn = new_group([msp.name])
    assert json.loads((knn / "PACS_DG_Photo_resend_knn.json").read_text())["settings"]["NNK"] == 2
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--few_shot", "1", "--seed", "3"))
    record = json.loads((new_group([msp.name, knn.name]) / "PACS_DG_Photo_resend.json").read_text())
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
    group = only_group(random_checkpoint)
    summary = json.loads((group / "PACS_DG_summary.json").read_text())
    assert [row["method"] for row in summary["fpr95"]] == list(SCORERS)
    assert all(set(row) == {"method", "ArtPainting", "Cartoon", "Photo", "Sketch", "average"}
               for row in summary["auroc"])
    csv_rows = (group / "PACS_DG_summary.csv").read_text().splitlines()
    assert csv_rows[0] == "metric,method,ArtPainting,Cartoon,Photo,Sketch,average"
    assert len(csv_rows) == 1 + 5 * len(SCORERS)
    # Every method also has its own per-target files.
    assert (group / "PACS_DG_Sketch_mahalanobis.json").exists()
    assert (group / "PACS_DG_Sketch_featurenorm_scores.csv").exists()


def test_backbone_only_runs_baselines_without_checkpoint(pacs_root, tmp_path, capsys):
    out_dir = tmp_path / "backbone_eval"
    run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--backbone_only", "--backbone_weights", "none",
                  "--evaluator", "all"))
    out = capsys.readouterr().out
    assert "prototype_cosine" in out and "resend" not in out.replace("results written", "")
    record = json.loads((only_group(out_dir) / "PACS_DG_Cartoon_knn.json").read_text())
    assert record["settings"]["backbone_weights"] == "none"
    with pytest.raises(ValueError, match="relational module"):
        run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--backbone_only", "--backbone_weights", "none",
                      "--evaluator", "resend"))
    with pytest.raises(ValueError, match="unknown --evaluator"):
        run(eval_argv(pacs_root, out_dir, "--target", "Cartoon", "--evaluator", "magic"))


# ---------------------------------------------------------------- evaluate as trained

TRAINED_ARGS = {"image_size": 32, "transf_n_heads": 12, "network": "resnet18", "loss_function": "L2",
                "transf_depth": 2, "seed": 0}


@pytest.fixture
def run_folder(random_checkpoint):
    """The informative checkpoint (its head fitted at 32 px) as a run folder whose args.json says 32 px."""
    (random_checkpoint / "args.json").write_text(json.dumps(TRAINED_ARGS))
    return random_checkpoint


def scores_of(group, stem="PACS_DG_ArtPainting_resend"):
    """(per-target JSON, normality column of the scores CSV) of one result in a group."""
    record = json.loads((group / f"{stem}.json").read_text())
    with open(group / f"{stem}_scores.csv", newline="", encoding="utf-8") as handle:
        normality = np.array([float(row["normality"]) for row in csv.DictReader(handle)])
    return record, normality


def new_group(folder, known):
    """The one group of `folder` whose name is not in `known`."""
    (name,) = set(groups_of(folder)) - set(known)
    return groups_of(folder)[name]


def test_run_folder_is_evaluated_as_trained(pacs_root, run_folder, capsys):
    run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size=None))
    out = capsys.readouterr().out
    assert f"settings of the run from {run_folder}/args.json: image_size 32, transf_n_heads 12" in out
    assert f"loaded iteration 7 from {run_folder}" in out
    trained = only_group(run_folder)
    assert re.fullmatch(r"PACS_DG_it7_[0-9a-f]{8}", trained.name)
    record, normality = scores_of(trained)
    settings = record["settings"]
    assert (settings["image_size"], settings["n_heads"], settings["depth"], settings["embed_dim"]) == (32, 12, 2, 768)
    assert settings["run_args"] == f"{run_folder}/args.json" and settings["overrides"] == {}
    assert record["group"] == {"name": trained.name, "settings_hash": trained.name[-8:]}
    # The authors' algorithm at the trained size gives the same numbers.
    model = load_model_folder(str(run_folder))
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    labels = np.array([label for _, label in split.scored])
    expected, _ = reference_resend(model.relational,
                                   reference_features(model.backbone, [p for p, _ in split.support], 32),
                                   [label for _, label in split.support],
                                   reference_features(model.backbone, [p for p, _ in split.scored], 32), 6)
    np.testing.assert_allclose(normality, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert record["auroc"] == pytest.approx(reference_auroc(expected, labels, 6), abs=1e-6)

    # Another size gives another AUROC, so the check above fails if args.json is ignored.
    run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size="224"))
    out = capsys.readouterr().out
    assert f"--image_size 224 overrides the run's 32 ({run_folder}/args.json)" in out
    overridden = new_group(run_folder, [trained.name])
    other, other_normality = scores_of(overridden)
    assert other["settings"]["image_size"] == 224
    assert other["settings"]["overrides"] == {"image_size": {"run": 32, "given": 224}}
    assert abs(other["auroc"] - record["auroc"]) > 0.05, (other["auroc"], record["auroc"])
    assert scores_of(trained)[0] == record  # the first group is untouched

    # A folder without args.json (the authors' release) keeps the defaults: 224 px, nothing printed
    # about settings. Same numbers as the override above, so the same group, refreshed.
    (run_folder / "args.json").unlink()
    run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size=None))
    out = capsys.readouterr().out
    assert "settings of the run" not in out and "overrides" not in out
    assert f"no args.json in {run_folder}: using --image_size 224, --transf_n_heads 12" in out
    assert set(groups_of(run_folder)) == {trained.name, overridden.name}
    default, default_normality = scores_of(overridden)
    assert default["settings"]["image_size"] == 224 and default["settings"]["run_args"] is None
    np.testing.assert_array_equal(default_normality, other_normality)


def test_trained_run_folder_reproduces_its_periodic_evaluation(image_tree, tmp_path, capsys):
    """A real run (32 px, 6 heads) evaluated with no flags gives its own periodic evaluation's scores."""
    root = image_tree({"train/a": 3, "train/b": 3, "target/a": 3, "target/b": 3, "target/z": 3},
                      root=tmp_path / "folder_data", size=20)
    data = ["--dataset", "Folder", "--source_dir", str(root / "train"), "--target_dir", str(root / "target"),
            "--num_workers", "0", "--device", "cpu", "--eval_batch_size", "4"]
    run(["--train_dir", str(root / "train"), "--checkpoint_folder_path", str(tmp_path / "runs"),
         "--image_size", "32", "--transf_n_heads", "6", "--transf_depth", "1", "--backbone_weights", "none",
         "--batch_size", "4", "--neg_to_pos_ratio", "1", "--iterations", "2", "--warmup", "1",
         "--log_period", "1", "--save_period", "2", "--eval_period", "2", "--eval_dataset", "Folder", *data])
    folder = tmp_path / "runs" / "Folder_resnet18_rel_transformer"
    (periodic,) = groups_of(folder).values()
    assert re.fullmatch(r"Folder_it2_[0-9a-f]{8}", periodic.name)
    manifest = json.loads((periodic / "manifest.json").read_text())
    assert manifest["kind"] == "periodic" and manifest["iteration"] == 2
    assert (manifest["settings"]["image_size"], manifest["settings"]["n_heads"]) == (32, 6)
    trained, trained_normality = scores_of(periodic, "Folder_custom_resend")
    capsys.readouterr()

    run(["--only_eval", "--checkpoint_folder_path", str(folder), *data])
    out = capsys.readouterr().out
    assert f"settings of the run from {folder}/args.json: image_size 32, transf_n_heads 6" in out
    assert "loaded iteration 2 from" in out
    evaluated = new_group(folder, [periodic.name])
    again, again_normality = scores_of(evaluated, "Folder_custom_resend")
    assert np.ptp(trained_normality) > 0
    np.testing.assert_allclose(again_normality, trained_normality, rtol=1e-5, atol=0)
    assert again["auroc"] == trained["auroc"] and again["fpr95"] == trained["fpr95"]

    # The head count is not in the checkpoint's tensors: the default 12 would score another model.
    run(["--only_eval", "--checkpoint_folder_path", str(folder), "--transf_n_heads", "12", *data])
    assert f"--transf_n_heads 12 overrides the run's 6 ({folder}/args.json)" in capsys.readouterr().out
    _, other_normality = scores_of(new_group(folder, [periodic.name, evaluated.name]), "Folder_custom_resend")
    assert np.abs(other_normality - trained_normality).max() > 1e-3 * np.abs(trained_normality).max()


@pytest.mark.parametrize("flags, message", [
    (["--network", "resnet50"], "--network resnet50 contradicts the checkpoint in {}, which holds a resnet18 backbone"),
    (["--loss_function", "CE"],
     "--loss_function CE contradicts the checkpoint in {}, which holds a head for the L2 objective (1 output)"),
    (["--transf_depth", "4"], "--transf_depth 4 contradicts the checkpoint in {}, which holds 2 relational blocks"),
], ids=["network", "loss_function", "transf_depth"])
def test_flags_contradicting_the_checkpoint_are_refused(pacs_root, run_folder, flags, message):
    with pytest.raises(RunSettingsError, match=re.escape(message.format(run_folder))):
        run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", *flags))
    assert not (run_folder / "eval").exists()


def test_args_json_that_disagrees_with_the_checkpoint_is_reported(pacs_root, run_folder, capsys):
    """A --pretrained run records its flags, not what it loaded: the checkpoint wins, visibly."""
    (run_folder / "args.json").write_text(json.dumps({**TRAINED_ARGS, "transf_depth": 4}))
    run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size=None))
    assert (f"warning: {run_folder}/args.json records --transf_depth 4 but the checkpoint holds 2 relational "
            "blocks; the checkpoint's is used") in capsys.readouterr().out
    assert json.loads((only_group(run_folder) / "manifest.json").read_text())["settings"]["depth"] == 2


def test_unreadable_args_json_is_an_error_naming_it(pacs_root, run_folder):
    (run_folder / "args.json").write_text('{"image_size": 32,')
    with pytest.raises(RunArgsError, match=f"cannot read the run's settings {run_folder}/args.json"):
        run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size=None))
    assert not (run_folder / "eval").exists()


# ---------------------------------------------------------------- result groups

def group_bytes(group):
    return {name: (group / name).read_bytes() for name in sorted(os.listdir(group))}


def test_other_settings_keep_earlier_groups_and_a_rerun_refreshes_its_own(pacs_root, random_checkpoint):
    few_shot = ["--target", "Photo", "--few_shot", "1"]
    run(eval_argv(pacs_root, random_checkpoint, *few_shot, "--seed", "0"))
    first = only_group(random_checkpoint)
    first_bytes = group_bytes(first)
    run(eval_argv(pacs_root, random_checkpoint, *few_shot, "--seed", "1"))
    second = new_group(random_checkpoint, [first.name])
    assert group_bytes(first) == first_bytes
    # The seeds pick other support images, so the two groups hold other numbers.
    assert not np.array_equal(scores_of(first, "PACS_DG_Photo_resend")[1], scores_of(second, "PACS_DG_Photo_resend")[1])
    second_bytes = group_bytes(second)

    run(eval_argv(pacs_root, random_checkpoint, *few_shot, "--seed", "0"))
    assert set(groups_of(random_checkpoint)) == {first.name, second.name}
    assert sorted(os.listdir(random_checkpoint / "eval")) == sorted([first.name, second.name])
    assert group_bytes(second) == second_bytes
    refreshed = group_bytes(first)
    before, after = (json.loads(files["manifest.json"]) for files in (first_bytes, refreshed))
    assert after["written_unix"] > before["written_unix"] and after["hash"] == before["hash"]
    assert refreshed["PACS_DG_Photo_resend_scores.csv"] == first_bytes["PACS_DG_Photo_resend_scores.csv"]


def test_tag_names_the_group_and_never_replaces_other_results(pacs_root, random_checkpoint):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--tag", "paper"))
    group = only_group(random_checkpoint)
    assert group.name == "paper"
    kept = group_bytes(group)
    with pytest.raises(GroupError, match=f"{random_checkpoint}/eval/paper holds an evaluation with other settings"):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--tag", "paper", "--seed", "4"))
    assert group_bytes(group) == kept
    with pytest.raises(ValueError, match="--tag 'a/b' must be 1-100 letters"):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--tag", "a/b"))
    training = train.parse_command_line(["--tag", "x", "--dataset", "Digits"])
    with pytest.raises(ValueError, match="--tag x names the result group of --only_eval"):
        eval_settings(training)


def test_summary_and_manifest_agree_with_the_per_target_files(pacs_root, random_checkpoint):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "all", "--evaluator", "resend,knn"))
    group = only_group(random_checkpoint)
    manifest = json.loads((group / "manifest.json").read_text())
    assert sorted(manifest["files"] + ["manifest.json"]) == sorted(os.listdir(group))
    assert manifest["targets"] == ["ArtPainting", "Cartoon", "Photo", "Sketch"]
    assert manifest["scorers"] == ["resend", "knn"] and manifest["kind"] == "only_eval"
    summary = json.loads((group / "PACS_DG_summary.json").read_text())
    aurocs = []
    for row in summary["auroc"]:
        for target in manifest["targets"]:
            stem = f"PACS_DG_{target}_{row['method']}"
            record = json.loads((group / f"{stem}.json").read_text())
            assert record["auroc"] == row[target] and record["settings"] == manifest["settings"]
            aurocs.append(row[target])
    assert len(set(aurocs)) > 2  # the comparison is between varying numbers


def test_unwritable_eval_folder_prints_the_table_then_fails_naming_it(pacs_root, random_checkpoint, capsys):
    (random_checkpoint / "eval").write_text("a file where the eval folder goes")
    with pytest.raises(GroupError, match=rf"cannot write the evaluation group {random_checkpoint}/eval/"
                                         r"PACS_DG_it7_[0-9a-f]{8}: "):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo"))
    out = capsys.readouterr().out
    assert "PACS_DG auroc" in out and "results written" not in out


def test_read_only_eval_folder_exits_non_zero_after_the_table(pacs_root, random_checkpoint):
    """From the command line: the table on stdout, then one error line naming the group, exit status 1."""
    eval_root = random_checkpoint / "eval"
    as_root = os.geteuid() == 0
    if as_root:  # root ignores permissions: a file in the eval folder's place fails the same way
        eval_root.write_text("not a folder")
    else:
        eval_root.mkdir()
        eval_root.chmod(0o555)
    try:
        result = subprocess.run([sys.executable, "train.py", *eval_argv(pacs_root, random_checkpoint,
                                                                       "--target", "Photo")],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        if not as_root:
            eval_root.chmod(0o755)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "PACS_DG auroc" in result.stdout and "results written" not in result.stdout
    reason = "File exists" if as_root else "Permission denied"
    group = rf"{random_checkpoint}/eval/PACS_DG_it7_[0-9a-f]{{8}}"
    assert re.fullmatch(rf"error: cannot write the evaluation group {group}: {reason}.*\n",
                        result.stderr.splitlines(keepends=True)[-1]), result.stderr[-2000:]


def test_failing_extra_warns_after_the_table_and_keeps_the_results(pacs_root, random_checkpoint, capsys):
    (random_checkpoint / "tensorboard").write_text("a file where the TensorBoard folder goes")
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo"))
    out = capsys.readouterr().out
    table = out.index("PACS_DG auroc")
    warning = out.index(f"warning: TensorBoard entries not written to {random_checkpoint}/tensorboard: Not a directory")
    written = out.index(f"results written to {only_group(random_checkpoint)}")
    assert table < warning < written
    assert (only_group(random_checkpoint) / "PACS_DG_Photo_resend.json").is_file()


def test_api_from_folder_reads_args_json_like_only_eval(pacs_root, run_folder, capsys):
    run(eval_argv(pacs_root, run_folder, "--target", "ArtPainting", image_size=None))
    record, normality = scores_of(only_group(run_folder))
    capsys.readouterr()
    detector = NoveltyDetector.from_folder(str(run_folder), batch_size=5)
    out = capsys.readouterr().out
    assert f"settings of the run from {run_folder}/args.json: image_size 32, transf_n_heads 12" in out
    assert f"loaded iteration 7 from {run_folder}" in out
    assert detector.settings["image_size"] == 32 and detector.settings["run_args"] == f"{run_folder}/args.json"
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    labels = np.array([label for _, label in split.scored])
    result = detector.fit([p for p, _ in split.support], [label for _, label in split.support])
    scores = result.score([p for p, _ in split.scored]).normality.numpy()
    np.testing.assert_allclose(scores, normality, rtol=0, atol=1e-5 * np.abs(normality).max())
    assert reference_auroc(scores, labels, 6) == pytest.approx(record["auroc"], abs=1e-9)
    # A keyword given explicitly overrides args.json, visibly.
    NoveltyDetector.from_folder(str(run_folder), image_size=64)
    assert f"image_size=64 overrides the run's 32 ({run_folder}/args.json)" in capsys.readouterr().out


def test_seconds_per_phase_are_printed_and_recorded(pacs_root, random_checkpoint, capsys):
    run(eval_argv(pacs_root, random_checkpoint, "--target", "Photo", "--evaluator", "resend,knn"))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("seconds: "))
    printed = {name: float(value) for name, value in (part.split() for part in line[len("seconds: "):].split(", "))}
    assert list(printed) == ["load", "features", "scoring", "writing"]
    assert all(value >= 0 for value in printed.values()) and printed["features"] > 0
    (group,) = [p for p in (random_checkpoint / "eval").iterdir() if p.is_dir()]
    manifest = json.loads((group / "manifest.json").read_text())
    assert manifest["seconds"] == pytest.approx(printed, abs=0.006)
    record = json.loads((group / "PACS_DG_Photo_knn.json").read_text())
    assert set(record["seconds"]) == {"load", "features", "scoring"}
    assert record["seconds"]["features"] == pytest.approx(printed["features"], abs=0.006)


def test_nnk_and_few_shot_reach_the_scores(pacs_root, random_checkpoint, capsys):
    """Each scoring setting changes the output; a setting dropped on the way would fail here."""
    def knn_scores(*extra):
        run(eval_argv(pacs_root, random_checkpoint, "--target", "ArtPainting", "--knn_distance_evaluator", *extra))
        groups = sorted((p for p in (random_checkpoint / "eval").iterdir() if p.is_dir()),
                        key=lambda p: p.stat().st_mtime)
        rows = (groups[-1] / "PACS_DG_ArtPainting_resend_knn_scores.csv").read_text().splitlines()[1:]
        return np.array([float(row.split(",")[3]) for row in rows]), json.loads(
            (groups[-1] / "PACS_DG_ArtPainting_resend_knn.json").read_text())
    one, record_one = knn_scores("--NNK", "1")
    three, record_three = knn_scores("--NNK", "3")
    assert record_one["settings"]["NNK"] == 1 and record_three["settings"]["NNK"] == 3
    # The mean of the 3 best scores never exceeds the best one, and is below it somewhere.
    assert np.all(three <= one + 1e-6) and np.any(three < one - 1e-4)
    few, record_few = knn_scores("--few_shot", "1", "--seed", "4")
    assert record_few["n_support"] == 6 and record_few["settings"]["few_shot"] == 1
    assert not np.allclose(few, one)
    capsys.readouterr()
    knn_scores("--few_shot", "5")
    assert ("--few_shot 5: PACS_DG/ArtPainting has fewer support images in 6 of 6 classes "
            "(dog, elephant, giraffe, guitar, horse, ...); all of theirs are used") in capsys.readouterr().out
