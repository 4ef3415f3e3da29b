"""Tests for models.checkpoint: the authors' layouts, strict loading and atomic saving."""
import os
import re

import pytest
import torch
from torchvision.models import resnet18 as tv_resnet18

from models.backbone import ResNetBackbone
from models.checkpoint import (
    FEATURE_EXTRACTOR_FILE,
    LAST_CHECKPOINT_FILE,
    RELATIONAL_FILE,
    CheckpointError,
    atomic_torch_save,
    backbone_state_from_any,
    backbone_state_to_authors,
    infer_network,
    load_model_folder,
    read_state_file,
    save_model_folder,
)
from models.relational import RelationalTransformer
from models.state_dicts import load_state_strict
from utils.atomic_files import atomic_write_text

HEADS = 4
SMALL = {"embed_dim": 32, "n_heads": HEADS}


@pytest.fixture(scope="module")
def torchvision_net():
    """A torchvision resnet18 in eval mode with non-default BatchNorm statistics."""
    torch.manual_seed(0)
    net = tv_resnet18(weights=None)
    # Non-default BN statistics, so that a silently skipped buffer would change the features.
    for name, buf in net.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
        elif name.endswith("num_batches_tracked"):
            buf.fill_(7)
    return net.eval()


def authors_layout(tv_state):
    """The authors' feature_extractor.pkl: model_resnet.* (with fc) plus top-level copies (no fc)."""
    state = {f"model_resnet.{k}": v for k, v in tv_state.items()}
    state.update({k: v for k, v in tv_state.items() if not k.startswith("fc.")})
    return state


def tv_features(net, x):
    """torchvision resnet18 features before its fc."""
    fc, net.fc = net.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = fc


def loaded_backbone(state):
    """Our backbone loaded (strictly) from a state dict in any accepted layout."""
    backbone = ResNetBackbone("resnet18")
    backbone.load_state_dict(backbone_state_from_any(state), strict=True)
    return backbone.eval()


def make_relational(n_outputs=1, depth=2, feat_dim=512):
    """A small, seeded relational module (same weights on every call)."""
    torch.manual_seed(1)
    return RelationalTransformer(feat_dim=feat_dim, n_outputs=n_outputs, depth=depth, **SMALL).eval()


def write_folder(folder, backbone_state, relational_state, last=None):
    """Write a checkpoint folder with plain torch.save, as the authors' code does."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(backbone_state, folder / FEATURE_EXTRACTOR_FILE)
    torch.save(relational_state, folder / RELATIONAL_FILE)
    if last is not None:
        (folder / LAST_CHECKPOINT_FILE).write_text(last)
    return folder


@pytest.fixture
def authors_folder(tmp_path, torchvision_net):
    """A folder laid out exactly like the authors' checkpoints (L2 head, depth 2)."""
    return write_folder(tmp_path / "ckpt", authors_layout(torchvision_net.state_dict()),
                        make_relational().state_dict(), last="1200\n")


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("layout", ["authors", "prefix_only", "ours"])
def test_backbone_layouts_give_torchvision_features(torchvision_net, layout):
    tv_state = torchvision_net.state_dict()
    if layout == "authors":
        state = authors_layout(tv_state)
    elif layout == "prefix_only":
        state = {f"model_resnet.{k}": v for k, v in tv_state.items()}
    else:
        state = {k: v for k, v in tv_state.items() if not k.startswith("fc.")}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = loaded_backbone(state)(x)
    assert torch.allclose(ours, tv_features(torchvision_net, x), atol=1e-6)
    converted = backbone_state_from_any(state)
    assert set(converted) == {k for k in tv_state if not k.startswith("fc.")}
    assert converted["bn1.num_batches_tracked"].item() == 7


def test_differing_copies_refused(torchvision_net):
    state = authors_layout(torchvision_net.state_dict())
    state["layer2.0.bn1.running_var"] = state["layer2.0.bn1.running_var"] + 1
    with pytest.raises(CheckpointError, match=r"layer2\.0\.bn1\.running_var"):
        backbone_state_from_any(state)
    state = authors_layout(torchvision_net.state_dict())
    del state["layer3.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"model_resnet\.layer3\.1\.conv2\.weight"):
        backbone_state_from_any(state)


def test_backbone_state_to_authors_has_both_copies_no_fc(torchvision_net):
    state = backbone_state_to_authors(torchvision_net.state_dict())
    plain = [k for k in torchvision_net.state_dict() if not k.startswith("fc.")]
    assert set(state) == set(plain) | {f"model_resnet.{k}" for k in plain}
    assert torch.equal(state["model_resnet.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_infer_network():
    assert infer_network(ResNetBackbone("resnet18").state_dict()) == "resnet18"
    assert infer_network({"layer1.0.conv1.weight": torch.zeros(1), "layer1.0.conv3.weight": torch.zeros(1)}) \
        == "resnet50"
    with pytest.raises(CheckpointError, match=r"^cannot infer the backbone network: no 'layer1\.0\.conv1\.weight' key in "
                                              r"the backbone state \(first keys: \[features\.0\.weight\]\)$"):
        infer_network({"features.0.weight": torch.zeros(1)})


# ---------------------------------------------------------------- loading a folder

def test_load_authors_folder(authors_folder, torchvision_net):
    loaded = load_model_folder(str(authors_folder), n_heads=HEADS)
    assert loaded.network == "resnet18" and loaded.objective == "L2"
    assert loaded.iteration == 1200 and loaded.folder == str(authors_folder)
    assert len(loaded.relational.blocks) == 2 and not loaded.backbone.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = loaded.backbone(x)
        assert torch.allclose(feats, tv_features(torchvision_net, x), atol=1e-6)
        expected = make_relational()(feats, feats.flip(0))
        assert torch.equal(loaded.relational(feats, feats.flip(0)), expected)


def test_ce_and_depth_detected(tmp_path, torchvision_net):
    folder = write_folder(tmp_path / "ce", authors_layout(torchvision_net.state_dict()),
                          make_relational(n_outputs=2, depth=3).state_dict())
    loaded = load_model_folder(folder, n_heads=HEADS)
    assert loaded.objective == "CE" and loaded.relational.n_outputs == 2
    assert len(loaded.relational.blocks) == 3 and loaded.iteration is None


def _corrupt(authors_folder, edit):
    """Apply `edit` to the relational state dict stored in the folder."""
    path = authors_folder / RELATIONAL_FILE
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_relational_key_refused(authors_folder):
    _corrupt(authors_folder, lambda s: s.pop("blocks.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]"):
        load_model_folder(authors_folder, n_heads=HEADS)


def test_misshaped_tensor_refused(authors_folder):
    _corrupt(authors_folder, lambda s: s.update({"norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"misshaped tensors \[norm\.weight: \(31,\)"):
        load_model_folder(authors_folder, n_heads=HEADS)


def test_unexpected_key_refused(authors_folder):
    _corrupt(authors_folder, lambda s: s.update({"pos_embed": torch.zeros(1, 3, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[pos_embed\]"):
        load_model_folder(authors_folder, n_heads=HEADS)


def test_backbone_missing_and_extra_keys_refused(tmp_path, torchvision_net):
    state = {k: v for k, v in torchvision_net.state_dict().items() if not k.startswith("fc.")}
    del state["layer4.1.bn2.running_mean"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    folder = write_folder(tmp_path / "bad", state, make_relational().state_dict())
    with pytest.raises(CheckpointError, match=r"feature_extractor\.pkl.*layer4\.1\.bn2\.running_mean.*layer5"):
        load_model_folder(folder, n_heads=HEADS)


def test_resnet50_backbone_with_512d_proj_refused(tmp_path):
    folder = write_folder(tmp_path / "mix", ResNetBackbone("resnet50").state_dict(), make_relational().state_dict())
    with pytest.raises(CheckpointError, match=r"512.*resnet50.*2048"):
        load_model_folder(folder, n_heads=HEADS)


def test_missing_folder_and_files_refused(tmp_path, authors_folder):
    with pytest.raises(CheckpointError, match="does_not_exist"):
        load_model_folder(tmp_path / "does_not_exist")
    (authors_folder / RELATIONAL_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"ckpt.*cls_rel\.pkl"):
        load_model_folder(authors_folder)


@pytest.mark.parametrize("content", [os.urandom(256), b"hello world\n", b""])
def test_garbage_file_refused_with_path(authors_folder, content):
    (authors_folder / FEATURE_EXTRACTOR_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"^cannot read .*ckpt/feature_extractor\.pkl as a torch state dict: \w+Error: "):
        load_model_folder(authors_folder, n_heads=HEADS)


def test_non_state_dict_refused(tmp_path):
    path = tmp_path / "list.pkl"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"list\.pkl holds a list"):
        read_state_file(str(path))
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match=r"list\.pkl.*'a'"):
        read_state_file(str(path))


def test_bad_last_checkpoint_refused(authors_folder):
    (authors_folder / LAST_CHECKPOINT_FILE).write_text("latest\n")
    with pytest.raises(CheckpointError, match=r"last_checkpoint\.txt.*'latest'"):
        load_model_folder(authors_folder, n_heads=HEADS)


# ---------------------------------------------------------------- saving

def test_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    backbone = ResNetBackbone("resnet18").eval()
    relational = make_relational(n_outputs=2, depth=2)
    folder = tmp_path / "out"
    save_model_folder(str(folder), backbone, relational, iteration=345)
    assert (folder / LAST_CHECKPOINT_FILE).read_text().strip() == "345"
    written = torch.load(folder / FEATURE_EXTRACTOR_FILE, weights_only=True)
    plain = list(backbone.state_dict())
    assert set(written) == set(plain) | {f"model_resnet.{k}" for k in plain}
    loaded = load_model_folder(str(folder), n_heads=HEADS)
    assert loaded.iteration == 345 and loaded.objective == "CE"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = backbone(x)
        assert torch.equal(loaded.backbone(x), feats)
        assert torch.equal(loaded.relational(feats, feats.flip(0)), relational(feats, feats.flip(0)))
    assert sorted(os.listdir(folder)) == sorted([FEATURE_EXTRACTOR_FILE, RELATIONAL_FILE, LAST_CHECKPOINT_FILE])


def test_saved_backbone_readable_by_authors_style_loader(tmp_path):
    # The authors' tools load into a torchvision resnet (kept as model_resnet) with strict=False.
    backbone = ResNetBackbone("resnet18")
    save_model_folder(tmp_path, backbone, make_relational(), iteration=None)
    written = torch.load(tmp_path / FEATURE_EXTRACTOR_FILE, weights_only=True)
    net = tv_resnet18(weights=None)
    prefixed = {k[len("model_resnet."):]: v for k, v in written.items() if k.startswith("model_resnet.")}
    result = net.load_state_dict(prefixed, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert not (tmp_path / LAST_CHECKPOINT_FILE).exists()


def test_save_with_iteration_none_removes_stale_iteration(tmp_path):
    backbone, relational = ResNetBackbone("resnet18"), make_relational()
    save_model_folder(tmp_path, backbone, relational, iteration=10)
    save_model_folder(tmp_path, backbone, relational, iteration=None)
    assert load_model_folder(tmp_path, n_heads=HEADS).iteration is None


def test_save_rejects_wrapped_modules_and_bad_iteration(tmp_path):
    backbone, relational = ResNetBackbone("resnet18"), make_relational()
    with pytest.raises(TypeError, match="Sequential"):
        save_model_folder(tmp_path, torch.nn.Sequential(backbone), relational, iteration=1)
    with pytest.raises(ValueError, match="-1"):
        save_model_folder(tmp_path, backbone, relational, iteration=-1)
    assert os.listdir(tmp_path) == []


def _saved_folder(tmp_path):
    """A checkpoint at iteration 100 plus new modules that differ from it."""
    torch.manual_seed(3)
    old_backbone = ResNetBackbone("resnet18").eval()
    save_model_folder(tmp_path, old_backbone, make_relational(), iteration=100)
    new_backbone = ResNetBackbone("resnet18")
    with torch.no_grad():
        for p in new_backbone.parameters():
            p.add_(1.0)
    return old_backbone, new_backbone


def _assert_previous_checkpoint(tmp_path, old_backbone):
    """The folder holds exactly the iteration-100 checkpoint and no temp files."""
    assert sorted(os.listdir(tmp_path)) == sorted([FEATURE_EXTRACTOR_FILE, RELATIONAL_FILE, LAST_CHECKPOINT_FILE])
    loaded = load_model_folder(tmp_path, n_heads=HEADS)
    assert loaded.iteration == 100
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x), old_backbone(x))


def test_kill_during_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old_backbone, new_backbone = _saved_folder(tmp_path)
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the backbone is staged; die half way through the relational file
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt, match="^killed$"):
        save_model_folder(tmp_path, new_backbone, make_relational(), iteration=200)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 2
    _assert_previous_checkpoint(tmp_path, old_backbone)


def test_failing_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old_backbone, new_backbone = _saved_folder(tmp_path)

    def failing_replace(src, dst):
        raise OSError(f"disk gone while replacing {dst}")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        save_model_folder(tmp_path, new_backbone, make_relational(), iteration=200)
    monkeypatch.undo()
    _assert_previous_checkpoint(tmp_path, old_backbone)


def test_atomic_helpers_overwrite_and_survive_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pkl"
    atomic_torch_save({"a": torch.ones(2)}, str(path))
    atomic_torch_save({"a": torch.zeros(2)}, str(path))
    assert torch.equal(read_state_file(str(path))["a"], torch.zeros(2))
    text = tmp_path / "t.txt"
    atomic_write_text(str(text), "5\n")
    assert text.read_text() == "5\n"

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(RuntimeError, match="killed"):
        atomic_torch_save({"a": torch.full((2,), 9.0)}, str(path))
    monkeypatch.undo()
    assert torch.equal(read_state_file(str(path))["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["t.txt", "x.pkl"]


# ---------------------------------------------------------------- state_dicts: messages and reading

def _raises_checkpoint_error(message):
    """pytest.raises(CheckpointError) whose message must be exactly `message`."""
    return pytest.raises(CheckpointError, match="^" + re.escape(message) + "$")


def _linears(n):
    """A Sequential of n Linear(1, 1) layers: keys '0.weight', '0.bias', ... (2n keys)."""
    return torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(n)])


def test_load_state_strict_message_lists_every_problem_kind():
    module = _linears(2)
    state = dict(module.state_dict())
    del state["1.bias"]
    state["0.weight"] = torch.zeros(1, 3)
    state["extra"] = torch.zeros(1)
    with _raises_checkpoint_error("src.pkl does not match Sequential: missing keys [1.bias]; unexpected keys "
                                  "[extra]; misshaped tensors [0.weight: (1, 3) vs model (1, 1)]"):
        load_state_strict(module, state, source="src.pkl")


def test_load_state_strict_message_is_bounded_at_20_keys():
    # 20 missing keys are all listed; from 21 on, the first 20 in sorted order and a count.
    twenty = sorted(_linears(10).state_dict())
    with _raises_checkpoint_error(f"s does not match Sequential: missing keys [{', '.join(twenty)}]"):
        load_state_strict(_linears(10), {}, source="s")
    module = _linears(11)
    keys = sorted(module.state_dict())
    assert keys[:3] == ["0.bias", "0.weight", "1.bias"] and len(keys) == 22
    with _raises_checkpoint_error(f"s does not match Sequential: missing keys [{', '.join(keys[:20])}] ... (+2 more)"):
        load_state_strict(module, {}, source="s")
    state = {k: v for k, v in module.state_dict().items() if k != "10.bias"}
    with _raises_checkpoint_error("s does not match Sequential: missing keys [10.bias]"):
        load_state_strict(module, state, source="s")


def test_load_state_strict_loads_the_values():
    module, source = _linears(2), _linears(2)
    load_state_strict(module, source.state_dict(), source="s")
    for key, value in source.state_dict().items():
        assert torch.equal(module.state_dict()[key], value)


def test_infer_network_message_shows_the_first_five_keys():
    state = {f"k{i}": torch.zeros(1) for i in range(7)}
    with _raises_checkpoint_error("cannot infer the backbone network: no 'layer1.0.conv1.weight' key in the "
                                  "backbone state (first keys: [k0, k1, k2, k3, k4] ... (+2 more))"):
        infer_network(state)


def test_read_state_file_missing_file_named(tmp_path):
    path = str(tmp_path / "nowhere.pkl")
    with _raises_checkpoint_error(f"checkpoint file not found: {path}"):
        read_state_file(path)


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("first line\nsecond line"), "RuntimeError: first line"),
    (EOFError(), "EOFError: "),
    (KeyError(101), "KeyError: 101"),
])
def test_read_state_file_reports_the_load_error(tmp_path, monkeypatch, error, shown):
    path = tmp_path / "x.pkl"
    torch.save({"a": torch.zeros(1)}, path)

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with _raises_checkpoint_error(f"cannot read {path} as a torch state dict: {shown}"):
        read_state_file(str(path))


def test_read_state_file_loads_weights_only_where_asked(tmp_path, monkeypatch):
    path = tmp_path / "x.pkl"
    torch.save({"a": torch.ones(2)}, path)
    real_load, calls = torch.load, []

    def spying_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    state = read_state_file(str(path), map_location="meta")
    # weights_only=True explicitly: before torch 2.6 (requirements admit 2.2) the default was False.
    assert calls == [{"map_location": "meta", "weights_only": True}]
    assert state["a"].device.type == "meta" and state["a"].shape == (2,)


class _Payload:
    """A pickled object whose loading would create a file (arbitrary code with weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_state_file_never_runs_pickled_code(tmp_path):
    path, marker = tmp_path / "evil.pkl", tmp_path / "ran"
    torch.save({"a": torch.zeros(1), "b": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=f"^cannot read {re.escape(str(path))} as a torch state dict: "
                                              "UnpicklingError: "):
        read_state_file(str(path))
    assert not marker.exists()


def test_read_state_file_reads_the_open_handle(tmp_path):
    real = tmp_path / "real.pkl"
    torch.save({"a": torch.full((2,), 3.0)}, real)
    # `path` only names the file in messages once a handle is given: it need not exist.
    with open(real, "rb") as handle:
        state = read_state_file(str(tmp_path / "label.pkl"), handle=handle)
    assert torch.equal(state["a"], torch.full((2,), 3.0))
    (tmp_path / "bad.pkl").write_bytes(b"not a checkpoint")
    with open(tmp_path / "bad.pkl", "rb") as handle, \
            pytest.raises(CheckpointError, match=r"^cannot read .*label\.pkl as a torch state dict"):
        read_state_file(str(tmp_path / "label.pkl"), handle=handle)
