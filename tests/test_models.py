"""Tests for models.backbone, models.relational and models.objective."""
import math

import pytest
import torch
from torch import nn

from models.backbone import NETWORKS, ResNetBackbone, fold_batchnorm
from models.objective import OBJECTIVES, l2_output, predict_different, relation_loss
from models.relational import RelationalTransformer

SMALL = {"embed_dim": 32, "depth": 2, "n_heads": 4}


@pytest.fixture(scope="module")
def resnet18():
    """A seeded resnet18 backbone in eval mode, shared by the module's tests."""
    torch.manual_seed(0)
    return ResNetBackbone("resnet18").eval()


# ---------------------------------------------------------------- backbone

def test_networks_constant():
    assert NETWORKS == {"resnet18": 512, "resnet50": 2048}


def test_resnet18_forward_shape_and_state_keys(resnet18):
    feats = resnet18(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512)
    assert resnet18.network == "resnet18" and resnet18.feat_dim == 512
    keys = resnet18.state_dict().keys()
    assert "conv1.weight" in keys and "layer1.0.conv1.weight" in keys and "bn1.running_mean" in keys
    assert not any(k.startswith("fc.") for k in keys)
    assert not hasattr(resnet18, "fc")


def test_resnet50_forward_shapes():
    backbone = ResNetBackbone("resnet50").eval()
    with torch.no_grad():
        feats, norms = backbone(torch.randn(2, 3, 16, 16), return_block_norms=True)
    assert feats.shape == (2, 2048) and norms.shape == (2, 16)
    assert backbone.feat_dim == 2048 and "layer1.0.conv3.weight" in backbone.state_dict()
    assert len(backbone.block_names()) == 16 and backbone.block_names()[-1] == "layer4.2"


def test_block_names_resnet18(resnet18):
    assert resnet18.block_names() == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]


def test_unknown_network_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        ResNetBackbone("vgg16")


def test_missing_weights_file_named(tmp_path):
    path = str(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        ResNetBackbone("resnet18", weights=path)


def test_weights_from_state_dict_path(tmp_path, resnet18):
    path = tmp_path / "backbone.pt"
    torch.save(resnet18.state_dict(), path)
    loaded = ResNetBackbone("resnet18", weights=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), resnet18(x))


def test_channels_last_input_gives_same_features(resnet18):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = resnet18(x)
        channels_last = resnet18(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, channels_last, atol=1e-5)


def test_block_norms_match_manual_forward(resnet18):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, norms = resnet18(x, return_block_norms=True)
        plain = resnet18(x)
        h = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        expected = []
        for name in resnet18.block_names():
            h = resnet18.get_submodule(name)(h)
            # per channel: sqrt of the sum of squares over H, W; then the mean over channels
            per_channel = h.pow(2).sum(dim=(2, 3)).sqrt()
            expected.append(per_channel.sum(dim=1) / h.shape[1])
        manual_feats = h.mean(dim=(2, 3))
    assert norms.shape == (2, 8)
    assert torch.allclose(norms, torch.stack(expected, dim=1), rtol=1e-5)
    assert torch.equal(feats, plain)
    assert torch.allclose(feats, manual_feats, atol=1e-6)
    assert (norms > 0).all()


def test_block_norms_are_of_post_relu_output(resnet18):
    # A forward hook sees exactly the block's returned tensor (after the block's final ReLU).
    captured = []
    handle = resnet18.layer2[1].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            _, norms = resnet18(torch.randn(2, 3, 32, 32), return_block_norms=True)
    finally:
        handle.remove()
    out = captured[0]
    assert (out >= 0).all()
    index = resnet18.block_names().index("layer2.1")
    expected = torch.stack([torch.stack([out[b, c].norm() for c in range(out.shape[1])]).mean() for b in range(2)])
    assert torch.allclose(norms[:, index], expected, rtol=1e-5)


def _randomise_batchnorm(backbone):
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    gen = torch.Generator().manual_seed(1)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return backbone


@pytest.mark.parametrize("network", ["resnet18", "resnet50"])
def test_fold_batchnorm_same_features_and_norms(network):
    torch.manual_seed(0)
    backbone = _randomise_batchnorm(ResNetBackbone(network)).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    folded = fold_batchnorm(backbone)
    assert not folded.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    # The given module is untouched: still in train mode, same tensors, all its BatchNorms.
    assert backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, norms = backbone.eval()(x, return_block_norms=True)
        folded_feats, folded_norms = folded(x, return_block_norms=True)
    assert torch.allclose(folded_feats, feats, rtol=1e-5, atol=1e-5 * feats.abs().max().item())
    assert torch.allclose(folded_norms, norms, rtol=1e-5)


def test_fold_batchnorm_refuses_other_modules():
    with pytest.raises(TypeError, match="ResNetBackbone.*Sequential"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_fold_batchnorm_refuses_unfoldable_norms():
    backbone = ResNetBackbone("resnet18")
    backbone.layer1[0].bn2 = nn.GroupNorm(8, 64)
    with pytest.raises(TypeError, match="cannot fold GroupNorm into Conv2d"):
        fold_batchnorm(backbone)
    backbone = ResNetBackbone("resnet18")
    backbone.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        fold_batchnorm(backbone)


# ---------------------------------------------------------------- relational

@pytest.mark.parametrize("n_outputs, objective", [(1, "L2"), (2, "CE")])
def test_relational_forward_shape(n_outputs, objective):
    model = RelationalTransformer(feat_dim=16, n_outputs=n_outputs, **SMALL)
    out = model(torch.randn(2, 16), torch.randn(2, 16))
    assert out.shape == (2, n_outputs)
    assert model.objective == objective


def test_relational_state_keys_match_authors():
    model = RelationalTransformer(feat_dim=16, **SMALL)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "proj.weight", "proj.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert set(model.state_dict()) == expected
    assert model.cls_token.shape == (1, 1, 32)
    assert model.blocks[0].mlp.fc1.out_features == 128
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


def test_relational_vit_init():
    torch.manual_seed(0)
    model = RelationalTransformer()  # the real size: 768-d, 4 blocks, 12 heads
    assert len(model.blocks) == 4 and model.blocks[0].attn.num_heads == 12
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.count_nonzero(module.bias) == 0
    for weight in (model.blocks[0].attn.qkv.weight, model.proj.weight, model.head.weight):
        assert math.isclose(weight.std().item(), 0.02, rel_tol=0.1)
        assert abs(weight.mean().item()) < 0.002
    assert math.isclose(model.cls_token.std().item(), 0.02, rel_tol=0.2)
    assert torch.count_nonzero(model.head.weight) > 0


def test_relational_zero_head_outputs_zero():
    model = RelationalTransformer(feat_dim=16, n_outputs=2, head_init="zero", **SMALL)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.proj.weight) > 0
    assert torch.equal(model(torch.randn(2, 16), torch.randn(2, 16)), torch.zeros(2, 2))


def test_relational_bad_arguments():
    with pytest.raises(ValueError, match="head_init.*'xavier'"):
        RelationalTransformer(feat_dim=16, head_init="xavier", **SMALL)
    with pytest.raises(ValueError, match=r"^n_outputs must be 1 \(L2 objective\) or 2 \(CE objective\); got 3$"):
        RelationalTransformer(feat_dim=16, n_outputs=3, **SMALL)
    model = RelationalTransformer(feat_dim=16, **SMALL)
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        model(torch.randn(2, 8), torch.randn(2, 8))


def test_pair_tokens_are_symmetric_but_both_used():
    # Without a positional embedding (the authors' checkpoints have none) attention pools the two pair
    # tokens as a set, so the cls output cannot depend on their order; it must depend on both features.
    torch.manual_seed(0)
    model = RelationalTransformer(feat_dim=16, **SMALL)
    a, b, c = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        ab, ba, ac, cb = model(a, b), model(b, a), model(a, c), model(c, b)
    assert torch.allclose(ab, ba, atol=1e-6)
    assert not torch.allclose(ab, ac, atol=1e-4)
    assert not torch.allclose(ab, cb, atol=1e-4)


def _full_forward(model, feat_a, feat_b):
    """The textbook forward: every block on every token, then the cls row."""
    tokens = torch.cat((model.cls_token.expand(feat_a.shape[0], -1, -1),
                        model.proj(torch.stack((feat_a, feat_b), dim=1))), dim=1)
    for block in model.blocks:
        tokens = block(tokens)
    return model.head(model.norm(tokens)[:, 0])


@pytest.mark.parametrize("depth", [1, 3])
def test_relational_forward_equals_full_blocks(depth):
    # forward() skips the last block's MLP on the two pair tokens; output and gradients must not change.
    torch.manual_seed(0)
    model = RelationalTransformer(feat_dim=16, n_outputs=2, embed_dim=32, depth=depth, n_heads=4)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    out, ref = model(a, b), _full_forward(model, a, b)
    assert torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for (name, _), grad, ref_grad in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(grad, ref_grad, atol=1e-6), name


def test_relational_batch_independent():
    torch.manual_seed(0)
    model = RelationalTransformer(feat_dim=16, **SMALL)
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        both = model(a, b)
        first = model(a[:1], b[:1])
    assert torch.allclose(both[:1], first, atol=1e-6)


# ---------------------------------------------------------------- objective

def test_objectives_constant():
    assert OBJECTIVES == ("L2", "CE")


def test_l2_output_values():
    logits = torch.tensor([[0.0], [0.1], [-0.1]])
    s = 1 / (1 + math.exp(-1.0))  # sigmoid(10 * 0.1)
    expected = torch.tensor([0.0, 2 * s - 1, 2 * (1 - s) - 1])
    assert torch.allclose(l2_output(logits), expected)
    assert torch.allclose(l2_output(logits[:, 0]), expected)
    # compression 1, expansion 4: 4 * sigmoid(0.1) - 2
    assert torch.allclose(l2_output(torch.tensor([0.1]), 1.0, 4.0),
                          torch.tensor([4 / (1 + math.exp(-0.1)) - 2]))
    with pytest.raises(ValueError, match=r"^L2 objective expects logits of shape \[B, 1\] or \[B\]; got \(2, 2\)$"):
        l2_output(torch.zeros(2, 2))


def test_l2_loss_hand_computed():
    logits = torch.tensor([[0.0], [0.1]])
    relation = torch.tensor([1, 0])
    s = 1 / (1 + math.exp(-1.0))
    out1 = 2 * s - 1
    # targets: +1 for "different" (relation 1), -1 for "same" (relation 0) with expansion 2
    expected = ((0.0 - 1.0) ** 2 + (out1 + 1.0) ** 2) / 2
    assert math.isclose(relation_loss(logits, relation, "L2").item(), expected, rel_tol=1e-6)
    # expansion 4: targets +-2, output 0 for logit 0
    assert math.isclose(relation_loss(torch.zeros(1, 1), torch.tensor([0]), "L2", 10.0, 4.0).item(), 4.0)


def test_l2_loss_uses_compression_and_expansion():
    logits = torch.tensor([[0.3], [-0.2], [0.05]])
    relation = torch.tensor([1, 0, 0])
    for c, e in ((10.0, 2.0), (1.0, 4.0), (3.0, 0.5)):
        outputs = [e / (1 + math.exp(-c * x)) - e / 2 for x in (0.3, -0.2, 0.05)]
        targets = [e / 2, -e / 2, -e / 2]
        expected = sum((o - t) ** 2 for o, t in zip(outputs, targets)) / 3
        assert math.isclose(relation_loss(logits, relation, "L2", c, e).item(), expected, rel_tol=1e-5)
    # The defaults are c = 10, e = 2.
    assert relation_loss(logits, relation, "L2").item() == relation_loss(logits, relation, "L2", 10.0, 2.0).item()
    assert relation_loss(logits, relation, "L2").item() != pytest.approx(relation_loss(logits, relation, "L2", 1.0, 2.0).item())


def test_l2_loss_keeps_float64_precision():
    # Targets in the logits' dtype: with e = 0.3 a float32 target (0.15 -> 0.15000000596) moves the loss by ~1e-8.
    logits = torch.tensor([[0.1], [-0.4]], dtype=torch.float64)
    relation = torch.tensor([1, 0])
    c, e = 2.0, 0.3
    outputs = [e / (1 + math.exp(-c * x)) - e / 2 for x in (0.1, -0.4)]
    expected = ((outputs[0] - e / 2) ** 2 + (outputs[1] + e / 2) ** 2) / 2
    loss = relation_loss(logits, relation, "L2", c, e)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), expected, rel_tol=1e-13)


def test_ce_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    relation = torch.tensor([1, 0])
    expected = (-math.log(math.exp(0) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert math.isclose(relation_loss(logits, relation, "CE").item(), expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"^CE objective expects logits of shape \[B, 2\]; got \(2, 1\)$"):
        relation_loss(torch.zeros(2, 1), relation, "CE")


def test_predictions():
    l2_logits = torch.tensor([[0.3], [-0.2], [0.0]])
    assert predict_different(l2_logits, "L2").tolist() == [True, False, False]
    # c and e scale the output but cannot move its sign: the prediction is the logit's sign.
    assert predict_different(l2_logits, "L2", 1.0, 4.0).tolist() == [True, False, False]
    ce_logits = torch.tensor([[0.5, 1.5], [3.0, -1.0]])
    assert predict_different(ce_logits, "CE").tolist() == [True, False]


def test_unknown_objective():
    with pytest.raises(ValueError, match="'BCE'"):
        predict_different(torch.zeros(2, 1), "BCE")
    with pytest.raises(ValueError, match="'BCE'"):
        relation_loss(torch.zeros(2, 1), torch.tensor([0, 1]), "BCE")
