"""--backbone_checkpoint: another network's backbone under a checkpoint's relational module (plug and play).

The backbone is a torchvision ResNet-18 classifier fine-tuned for a few SGD steps on the known
classes and saved as its `state_dict()` (classifier included); the expected scores come from that
file loaded by torchvision alone and the relational module loaded by hand, scored with the
authors' algorithm (tests/authors_reference.py), independent of the project's loading and scoring.
"""
import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms

import train
from datasets.benchmarks import get_eval_split
from evaluation.api import NoveltyDetector
from evaluation.groups import group_name, settings_hash
from models.backbone import ResNetBackbone
from models.backbone_file import load_backbone_file
from models.checkpoint import CheckpointError
from models.relational import RelationalTransformer
from models.resend import ReSeND
from tests.authors_reference import MEAN, STD, reference_features, reference_resend
from models.checkpoint import save_model_folder
from tests.conftest import save_informative_checkpoint
from tests.imagegen import make_image_tree
from tests.test_only_eval import eval_argv, groups_of, only_group, run
from training.main import load_eval_backbone
from training.state import resume_differences

IMAGE_SIZE = 32
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
N_KNOWN = 6  # ArtPainting: person is the novel class


def finetune_classifier(paths, labels, n_classes, out, steps=3, seed=0):
    """A torchvision ResNet-18 classifier after a few SGD steps on the images (32 px), saved as a user would:
    torch.save(model.state_dict()), its fc of `n_classes` rows included. Returns the file."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=n_classes)
    to_input = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor(),
                                   transforms.Normalize(MEAN, STD)])
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(to_input(image.convert("RGB")))
    inputs, targets = torch.stack(images), torch.tensor(labels)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()  # the BatchNorm running statistics move away from the initial ones too
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(inputs), targets).backward()
        optimiser.step()
    torch.save(net.state_dict(), out)
    return Path(out)


def hand_backbone(path, n_classes):
    """The classifier saved in `path`, loaded by torchvision alone, without its fc: features [N, 512]."""
    net = torchvision.models.resnet18(num_classes=n_classes)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.fc = nn.Identity()
    return net.eval()


def hand_relational(folder, depth, n_outputs=1, n_heads=12):
    """The relational module of a checkpoint folder's cls_rel.pkl, loaded with load_state_dict alone."""
    relational = RelationalTransformer(feat_dim=512, n_outputs=n_outputs, depth=depth, n_heads=n_heads)
    relational.load_state_dict(torch.load(os.path.join(folder, "cls_rel.pkl"), weights_only=True))
    return relational.eval()


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def csv_scores(group, stem):
    """(normality, preds) of a result group's `<stem>_scores.csv`."""
    rows = [line.split(",") for line in (group / f"{stem}_scores.csv").read_text().strip().splitlines()[1:]]
    return np.array([float(row[3]) for row in rows]), np.array([int(row[4]) if row[4] else -1 for row in rows])


@pytest.fixture
def pacs_root(image_tree, tmp_path):
    """Every PACS domain/class folder with 2 tiny images (3 for art_painting, the scored domain)."""
    layout = {f"PACS/kfold/{d}/{c}": (3 if d == "art_painting" else 2) for d in DOMAINS for c in PACS_CLASSES}
    return image_tree(layout, root=tmp_path / "data", size=20)


@pytest.fixture
def plugged(pacs_root, tmp_path):
    """A classifier fine-tuned on ArtPainting's known classes, and a checkpoint whose relational head was
    fitted on that classifier's features (so its scores on them spread and predict several classes)."""
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    support = [path for path, _ in split.support]
    labels = [label for _, label in split.support]
    classifier = finetune_classifier(support, labels, N_KNOWN, tmp_path / "finetuned_resnet18.pth")
    backbone = hand_backbone(classifier, N_KNOWN)
    checkpoint = save_informative_checkpoint(tmp_path / "ckpt", split.support, IMAGE_SIZE, head_backbone=backbone)
    scored = [path for path, _ in split.scored]
    normality, preds = reference_resend(hand_relational(checkpoint, depth=2),
                                        reference_features(backbone, support, IMAGE_SIZE), labels,
                                        reference_features(backbone, scored, IMAGE_SIZE), N_KNOWN)
    # Informative: scores spread over 1000x the tolerance (1e-4 of their ~0.3 scale), several predicted classes.
    assert np.ptp(normality) > 0.05 and len(set(preds.tolist())) >= 2, (np.ptp(normality), preds)
    return SimpleNamespace(root=pacs_root, split=split, support=support, labels=labels, scored=scored,
                           classifier=classifier, checkpoint=checkpoint, normality=normality, preds=preds)


def loaded_line(classifier):
    return (f"backbone from {classifier} (resnet18, sha256 {sha256_of(classifier)[:16]}, "
            "classifier fc.bias, fc.weight dropped)")


def test_only_eval_scores_the_checkpoint_relational_module_on_the_given_backbone(plugged, capsys):
    ckpt, classifier = plugged.checkpoint, plugged.classifier
    run(eval_argv(plugged.root, ckpt, "--target", "ArtPainting", "--backbone_checkpoint", str(classifier)))
    out = capsys.readouterr().out
    assert f"loaded iteration 7 from {ckpt} (relational module); {loaded_line(classifier)}\n" in out

    group = only_group(ckpt)
    assert re.fullmatch(r"PACS_DG_it7_bb-finetuned_resnet18_[0-9a-f]{8}", group.name)
    normality, preds = csv_scores(group, "PACS_DG_ArtPainting_resend")
    np.testing.assert_allclose(normality, plugged.normality, rtol=0, atol=1e-4 * np.abs(plugged.normality).max())
    assert np.array_equal(preds, plugged.preds)
    record = json.loads((group / "PACS_DG_ArtPainting_resend.json").read_text())
    manifest = json.loads((group / "manifest.json").read_text())
    for settings in (record["settings"], manifest["settings"]):
        assert settings["backbone_checkpoint"] == str(classifier)
        assert settings["backbone_sha256"] == sha256_of(classifier)
        assert settings["backbone_loaded"] == loaded_line(classifier)
        assert settings["loaded_from"] == str(ckpt) and settings["network"] == "resnet18"

    # The checkpoint's own backbone scores otherwise, in a group named as before, with no backbone entries.
    run(eval_argv(plugged.root, ckpt, "--target", "ArtPainting"))
    (own,) = [path for name, path in groups_of(ckpt).items() if name != group.name]
    assert re.fullmatch(r"PACS_DG_it7_[0-9a-f]{8}", own.name)
    own_normality, _ = csv_scores(own, "PACS_DG_ArtPainting_resend")
    assert np.abs(own_normality - normality).max() > 0.01
    own_settings = json.loads((own / "manifest.json").read_text())["settings"]
    assert not any(key.startswith("backbone_") for key in own_settings)


def test_api_scores_the_checkpoint_relational_module_on_the_given_backbone(plugged, capsys):
    detector = NoveltyDetector.from_folder(str(plugged.checkpoint), image_size=IMAGE_SIZE,
                                           backbone_checkpoint=str(plugged.classifier), batch_size=4)
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"loaded iteration 7 from {plugged.checkpoint} (relational module); {loaded_line(plugged.classifier)}"
    result = detector.fit(plugged.support, plugged.labels).score(plugged.scored)
    np.testing.assert_allclose(result.normality.numpy(), plugged.normality, rtol=0,
                               atol=1e-4 * np.abs(plugged.normality).max())
    assert np.array_equal(result.pred.numpy(), plugged.preds)
    assert detector.settings["backbone_checkpoint"] == str(plugged.classifier)
    assert detector.settings["backbone_sha256"] == sha256_of(plugged.classifier)
    assert detector.settings["backbone_loaded"] == loaded_line(plugged.classifier)

    own = NoveltyDetector.from_folder(str(plugged.checkpoint), image_size=IMAGE_SIZE, verbose=False)
    assert not any(key.startswith("backbone_") for key in own.settings)


def test_a_folder_with_only_the_relational_module_takes_a_backbone_checkpoint(plugged, tmp_path):
    """The backbone comes from the file: the checkpoint folder's feature_extractor.pkl is not needed."""
    folder = tmp_path / "relational_only"
    folder.mkdir()
    (folder / "cls_rel.pkl").write_bytes((plugged.checkpoint / "cls_rel.pkl").read_bytes())
    detector = NoveltyDetector.from_folder(str(folder), image_size=IMAGE_SIZE, verbose=False,
                                           backbone_checkpoint=str(plugged.classifier))
    result = detector.fit(plugged.support, plugged.labels).score(plugged.scored)
    np.testing.assert_allclose(result.normality.numpy(), plugged.normality, rtol=0,
                               atol=1e-4 * np.abs(plugged.normality).max())
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint folder {folder} lacks ['feature_extractor.pkl']")):
        NoveltyDetector.from_folder(str(folder), verbose=False)


def test_backbone_only_evaluates_the_backbone_of_the_file(plugged, tmp_path, capsys):
    """--backbone_only --backbone_checkpoint scores as --backbone_weights with the same weights, recorded and
    named after the file; the classifier's fc is dropped in both."""
    common = ["--backbone_only", "--evaluator", "prototype_cosine", "--target", "ArtPainting"]
    out = tmp_path / "baselines"
    run(eval_argv(plugged.root, out, *common, "--backbone_checkpoint", str(plugged.classifier)))
    assert loaded_line(plugged.classifier) in capsys.readouterr().out
    run(eval_argv(plugged.root, out, *common, "--backbone_weights", str(plugged.classifier)))
    groups = groups_of(out)
    (from_file,) = [path for name, path in groups.items() if "_bb-" in name]
    (from_weights,) = [path for name, path in groups.items() if "_bb-" not in name]
    assert re.fullmatch(r"PACS_DG_itna_bb-finetuned_resnet18_[0-9a-f]{8}", from_file.name)
    normality, _ = csv_scores(from_file, "PACS_DG_ArtPainting_prototype_cosine")
    assert np.ptp(normality) > 0
    np.testing.assert_array_equal(normality, csv_scores(from_weights, "PACS_DG_ArtPainting_prototype_cosine")[0])
    settings = json.loads((from_file / "manifest.json").read_text())["settings"]
    assert settings["backbone_sha256"] == sha256_of(plugged.classifier) and "backbone_weights" not in settings


def test_periodic_evaluation_scores_the_trained_relational_module_on_the_given_backbone(image_tree, tmp_path):
    root = image_tree({"train/a": 3, "train/b": 3, "target/a": 3, "target/b": 3, "target/z": 3},
                      root=tmp_path / "folder_data", size=20)
    support = [str(root / "train" / c / f"img_{i:03d}.jpg") for c in ("a", "b") for i in range(3)]
    classifier = finetune_classifier(support, [0, 0, 0, 1, 1, 1], 2, tmp_path / "finetuned_resnet18.pth")
    run(["--dataset", "Folder", "--train_dir", str(root / "train"), "--checkpoint_folder_path", str(tmp_path / "runs"),
         "--image_size", "32", "--transf_depth", "1", "--backbone_weights", "none", "--batch_size", "4",
         "--neg_to_pos_ratio", "1", "--iterations", "2", "--warmup", "1", "--log_period", "1", "--save_period", "2",
         "--eval_period", "2", "--eval_dataset", "Folder", "--source_dir", str(root / "train"),
         "--target_dir", str(root / "target"), "--num_workers", "0", "--device", "cpu", "--eval_batch_size", "4",
         "--backbone_checkpoint", str(classifier)])
    folder = tmp_path / "runs" / "Folder_resnet18_rel_transformer"
    (group,) = groups_of(folder).values()
    assert re.fullmatch(r"Folder_it2_bb-finetuned_resnet18_[0-9a-f]{8}", group.name)
    settings = json.loads((group / "manifest.json").read_text())["settings"]
    assert settings["backbone_sha256"] == sha256_of(classifier) and settings["iteration"] == 2
    assert f"periodic evaluation scores with the {loaded_line(classifier)}" in (folder / "out.txt").read_text()

    split = get_eval_split("Folder", None, None, source_dir=str(root / "train"), target_dir=str(root / "target"))
    backbone = hand_backbone(classifier, 2)
    expected, expected_preds = reference_resend(
        hand_relational(folder / "checkpoints" / "it000002", depth=1),
        reference_features(backbone, [path for path, _ in split.support], IMAGE_SIZE),
        [label for _, label in split.support],
        reference_features(backbone, [path for path, _ in split.scored], IMAGE_SIZE), 2)
    normality, preds = csv_scores(group, "Folder_custom_resend")
    assert np.ptp(expected) > 0
    np.testing.assert_allclose(normality, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert np.array_equal(preds, expected_preds)


def test_the_backbone_checkpoint_may_change_on_resume():
    """It only changes what the periodic evaluation scores, as --eval_dataset does."""
    assert resume_differences({"backbone_checkpoint": "a.pth"}, {"backbone_checkpoint": "b.pth"}) == ({}, {})


def test_common_containers_and_formats_give_the_same_backbone(plugged, tmp_path):
    state = torch.load(plugged.classifier, weights_only=True)
    expected = hand_backbone(plugged.classifier, N_KNOWN).state_dict()
    variants = {
        # timm's train.py and Lightning: {"state_dict": ...}; torchvision's references: {"model": ..., "args": ...}
        "lightning.ckpt": ({"state_dict": state, "epoch": 3}, ("its 'state_dict' entry",)),
        "reference.pth": ({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 2,
                           "args": argparse.Namespace(lr=0.1, model="resnet18")},
                          ("its 'model' entry", "'module.' prefix removed")),
        "compiled.pth": ({f"_orig_mod.{k}": v for k, v in state.items()}, ("'_orig_mod.' prefix removed",)),
        "feature_extractor.pkl": ({**{f"model_resnet.{k}": v for k, v in state.items() if not k.startswith("fc.")},
                                   **{k: v for k, v in state.items() if not k.startswith("fc.")}}, ()),
    }
    for name, (content, unwrapped) in variants.items():
        torch.save(content, tmp_path / name)
    save_file(state, str(tmp_path / "model.safetensors"))
    variants["model.safetensors"] = (None, ())
    for name, (_, unwrapped) in variants.items():
        backbone, info = load_backbone_file(str(tmp_path / name))
        assert info.unwrapped == unwrapped and info.network == "resnet18", name
        assert info.dropped == (() if name == "feature_extractor.pkl" else ("fc.bias", "fc.weight")), name
        assert not backbone.training
        loaded = backbone.state_dict()
        assert loaded.keys() == expected.keys() - {"fc.weight", "fc.bias"}
        assert all(torch.equal(loaded[key], expected[key]) for key in loaded), name


@pytest.fixture(scope="module")
def loadable(tmp_path_factory):
    """A PACS-like tree and a checkpoint folder (random weights) for the inputs refused before any scoring."""
    base = tmp_path_factory.mktemp("refused")
    layout = {f"PACS/kfold/{d}/{c}": 2 for d in DOMAINS for c in PACS_CLASSES}
    make_image_tree(base / "data", layout, size=20)
    save_model_folder(str(base / "ckpt"), ResNetBackbone("resnet18"), RelationalTransformer(depth=1), iteration=7)
    return SimpleNamespace(root=base / "data", checkpoint=base / "ckpt")


class Opaque:
    """Not a state dict: a pickled object of a test class."""


def resnet_state(network):
    return getattr(torchvision.models, network)().state_dict()


def bad_file(tmp_path, kind, checkpoint):
    """(path, expected message) of a --backbone_checkpoint file that cannot be used."""
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return path, f"backbone checkpoint not found: {path}"
    if kind == "folder":
        path.mkdir()
        return path, (f"backbone checkpoint {path} is a folder; give the state-dict file "
                      f"(e.g. {path}/feature_extractor.pkl)")
    if kind == "relational":
        path.write_bytes((checkpoint / "cls_rel.pkl").read_bytes())
        return path, (f"{path} holds a relational module (cls_token, proj.*, blocks.*), as cls_rel.pkl does, "
                      "not a backbone")
    if kind == "object":
        torch.save(Opaque(), path)
        return path, (f"cannot read {path} as a torch state dict: it holds a pickled {__name__}.Opaque object, "
                      "which is not loaded (only tensors and plain containers are); save model.state_dict()")
    if kind == "list":
        torch.save([torch.zeros(2)], path)
        return path, f"{path} holds a list, not a state dict"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
        return path, f"cannot read {path} as a torch state dict: "
    if kind == "not_resnet":
        torch.save({"features.0.weight": torch.zeros(2), "classifier.1.bias": torch.zeros(2)}, path)
        return path, (f"{path} is not a ResNet-18/50 backbone state dict: no 'layer1.0.conv1.weight' key "
                      "(first keys: [classifier.1.bias, features.0.weight])")
    if kind == "wrong_keys":
        state = resnet_state("resnet18")
        del state["layer4.1.bn2.weight"]
        state["head.weight"] = torch.zeros(2)
        torch.save(state, path)
        return path, (f"{path} does not match ResNetBackbone: missing keys [layer4.1.bn2.weight]; "
                      "unexpected keys [head.weight]")
    if kind == "resnet34":
        torch.save(resnet_state("resnet34"), path)
        return path, f"{path} does not match ResNetBackbone: unexpected keys [layer1.2.bn1.bias, "
    raise AssertionError(kind)


BAD_KINDS = ["missing", "folder", "relational", "object", "list", "garbage", "not_resnet", "wrong_keys", "resnet34"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_backbone_file_is_one_line_naming_it(loadable, tmp_path, kind, capsys):
    path, message = bad_file(tmp_path, kind, loadable.checkpoint)
    with pytest.raises(CheckpointError) as raised:
        load_backbone_file(str(path))
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    # The command line and the API give the same line, and write nothing.
    argv = eval_argv(loadable.root, loadable.checkpoint, "--target", "ArtPainting", "--backbone_checkpoint", str(path))
    assert train.run_command_line(argv) == 1
    assert capsys.readouterr().err == f"error: {raised.value}\n"
    assert not (loadable.checkpoint / "eval").exists()
    with pytest.raises(CheckpointError, match=re.escape(str(raised.value))):
        NoveltyDetector.from_folder(str(loadable.checkpoint), verbose=False, backbone_checkpoint=str(path))


def test_a_backbone_of_another_width_is_refused_naming_both(loadable, tmp_path, capsys):
    wide = tmp_path / "resnet50.pth"
    torch.save(resnet_state("resnet50"), wide)
    message = (f"{loadable.checkpoint}/cls_rel.pkl: proj.weight expects 512-d features but {wide} is a resnet50 "
               "with 2048-d features")
    argv = eval_argv(loadable.root, loadable.checkpoint, "--target", "ArtPainting", "--backbone_checkpoint", str(wide))
    assert train.run_command_line(argv) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (loadable.checkpoint / "eval").exists()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        NoveltyDetector.from_folder(str(loadable.checkpoint), verbose=False, backbone_checkpoint=str(wide))

    # During training: the relational module being trained takes the --network's width.
    model = ReSeND(ResNetBackbone("resnet18"), RelationalTransformer(feat_dim=512, depth=1))
    evaluation = SimpleNamespace(backbone_checkpoint=str(wide))
    with pytest.raises(CheckpointError, match=re.escape(
            f"--backbone_checkpoint {wide} is a resnet50 with 2048-d features but the relational module being "
            "trained takes 512-d features (a resnet18 backbone)")):
        load_eval_backbone(evaluation, model, torch.device("cpu"))
    # --backbone_only with an explicit --network of the other width.
    argv = eval_argv(loadable.root, tmp_path / "baselines", "--backbone_only", "--evaluator", "knn",
                     "--network", "resnet18", "--backbone_checkpoint", str(wide))
    assert train.run_command_line(argv) == 1
    assert capsys.readouterr().err == \
        f"error: --network resnet18 contradicts --backbone_checkpoint {wide}, which holds a resnet50\n"


def test_backbone_only_refuses_two_backbones(loadable, tmp_path, capsys):
    backbone = loadable.checkpoint / "feature_extractor.pkl"
    argv = eval_argv(loadable.root, tmp_path / "baselines", "--backbone_only", "--evaluator", "knn",
                     "--backbone_weights", "none", "--backbone_checkpoint", str(backbone))
    assert train.run_command_line(argv) == 2
    assert capsys.readouterr().err == ("error: --backbone_weights and --backbone_checkpoint both name the backbone "
                                       "of --backbone_only; give one\n")


def test_group_names_and_hashes_with_a_backbone_file():
    assert group_name("PACS_DG", 7, "0123abcd") == "PACS_DG_it7_0123abcd"
    assert group_name("PACS_DG", 7, "0123abcd", backbone_path="/w/ft.v2.pth") == "PACS_DG_it7_bb-ft.v2_0123abcd"
    assert group_name("PACS_DG", None, "0123abcd", backbone_path="/w/my model (v2).pt") == \
        "PACS_DG_itna_bb-my-model-v2-_0123abcd"
    assert group_name("PACS_DG", 7, "0123abcd", tag="mine", backbone_path="/w/ft.pth") == "mine"
    # The content's digest is hashed, not where the file lies.
    record = {"iteration": 7, "backbone_checkpoint": "/a/ft.pth", "backbone_sha256": "1" * 64,
              "backbone_loaded": "backbone from /a/ft.pth (...)"}
    moved = {**record, "backbone_checkpoint": "/b/ft.pth", "backbone_loaded": "backbone from /b/ft.pth (...)"}
    other = {**record, "backbone_sha256": "2" * 64}
    hashes = [settings_hash("only_eval", "PACS_DG", ["ArtPainting"], r) for r in (record, moved, other)]
    assert hashes[0] == hashes[1] != hashes[2]
