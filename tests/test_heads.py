"""Stage I heads: MoEHead, LinearHead, EmotionClassifier."""
import pytest
import torch
import torch.nn.functional as F

from models import EmotionClassifier, ExpertBlock, LinearHead, MoEHead, SwiGLU, ViT, ViTConfig

MOE_PARAMETERS = 75_859_724  # at dim 1024, 8 classes, 4 experts x 3 blocks, router hidden 256


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_moe_parameter_count():
    dim, hidden, router = 1024, 2048, 256
    block = 2 * dim + 2 * (dim * hidden + hidden) + (hidden * dim + dim)  # LN, value + gate, out
    expected = (2 * dim                                                    # input LN
                + (dim * router + router) + 2 * router + (router * 4 + 4)  # router
                + 4 * 3 * block                                            # experts
                + 2 * dim + (dim * 8 + 8))                                 # output LN, classifier
    assert expected == MOE_PARAMETERS
    head = _meta_moe()  # on the meta device: counts without allocating 300 MB
    assert count(head) == MOE_PARAMETERS
    assert 75e6 < MOE_PARAMETERS < 77e6  # "about 76M"


def _meta_moe(**kwargs):
    with torch.device("meta"):
        return MoEHead(**kwargs)


def test_moe_layout():
    head = _meta_moe()
    assert len(head.experts) == 4 and all(len(expert) == 3 for expert in head.experts)
    assert [block.drop_path_rate for block in head.experts[0]] == [0.0, 0.05, 0.10]
    assert head.dropout.p == 0.6 and head.experts[0][0].ffn.dropout.p == 0.1
    assert head.router[0].weight.shape == (256, 1024) and head.router[3].weight.shape == (4, 256)
    assert head.experts[0][0].ffn.value.weight.shape == (2048, 1024)
    assert head.experts[0][0].ffn.out.weight.shape == (1024, 2048)
    assert head.classifier.weight.shape == (8, 1024)
    with pytest.raises(ValueError):
        _meta_moe(blocks_per_expert=2)


def test_init():
    torch.manual_seed(0)
    head = MoEHead(dim=64, num_classes=8)
    w = head.experts[0][0].ffn.value.weight
    assert w.abs().max() <= 0.04 and 0.015 < w.std() < 0.025
    assert head.classifier.bias.abs().max() == 0 and head.router[0].bias.abs().max() == 0
    assert torch.equal(head.out_norm.weight, torch.ones(64)) and head.out_norm.bias.abs().max() == 0


def small_moe(**kwargs):
    torch.manual_seed(0)
    return MoEHead(dim=32, num_classes=8, router_hidden=16, **kwargs)


def test_moe_shapes_and_routing():
    head = small_moe().eval()
    x = torch.randn(5, 32)
    logits, weights = head(x, return_routing=True)
    assert logits.shape == (5, 8) and weights.shape == (5, 4)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(head(x), logits)
    # the output is the routing-weighted sum of the experts' outputs
    h = head.norm(x)
    mixed = sum(weights[:, e:e + 1] * expert(h) for e, expert in enumerate(head.experts))
    torch.testing.assert_close(head.classifier(head.out_norm(mixed)), logits)
    # samples are independent (no cross-sample mixing)
    torch.testing.assert_close(head(x[2:3]), logits[2:3])


def test_moe_eval_deterministic_train_stochastic():
    head = small_moe()
    x = torch.randn(16, 32)
    head.eval()
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
    head.train()
    torch.manual_seed(1)
    a = head(x)
    torch.manual_seed(2)
    b = head(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    torch.testing.assert_close(head(x), a, rtol=0, atol=0)  # same seed, same masks


def test_drop_path_in_train_mode():
    torch.manual_seed(0)
    block = ExpertBlock(8, 16, dropout=0.0, drop_path_rate=0.5).train()
    x = torch.randn(200, 8)
    y = block(x)
    skipped = (y == x).all(dim=1)  # a dropped sample's branch is zeroed: the block is the identity
    assert 0.3 < skipped.float().mean() < 0.7
    block.eval()
    assert not (block(x) == x).all(dim=1).any()


def test_swiglu_block_formula():
    torch.manual_seed(0)
    dim, hidden = 6, 12
    block = ExpertBlock(dim, hidden, dropout=0.3, drop_path_rate=0.1).eval()
    with torch.no_grad():  # non-trivial norm parameters
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, dim)
    f = block.ffn
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    n = (x - mean) / torch.sqrt(var + 1e-5) * block.norm.weight + block.norm.bias
    value = n @ f.value.weight.T + f.value.bias
    gate = n @ f.gate.weight.T + f.gate.bias
    expected = x + (value * (gate * torch.sigmoid(gate))) @ f.out.weight.T + f.out.bias
    torch.testing.assert_close(block(x), expected)
    # the SiLU is on `gate`, not on `value`
    swapped = x + (gate * (value * torch.sigmoid(value))) @ f.out.weight.T + f.out.bias
    assert not torch.allclose(block(x), swapped)
    assert isinstance(f, SwiGLU)


def test_linear_head():
    torch.manual_seed(0)
    head = LinearHead(32, 8, dropout=0.5).eval()
    x = torch.randn(4, 32)
    assert head(x).shape == (4, 8)
    torch.testing.assert_close(head(x), head.classifier(F.layer_norm(x, (32,))))
    logits, routing = head(x, return_routing=True)
    assert routing is None
    assert count(LinearHead(1024, 8)) == 2 * 1024 + 1024 * 8 + 8
    assert count(LinearHead(1024, 8, norm=False)) == 1024 * 8 + 8


def tiny_vit():
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                    num_register_tokens=2)
    vit = ViT(cfg)
    # ViT(cfg) gives torch's default initialisation for its layers, 1.0 layer scales and zero tokens
    # (placeholders for a checkpoint); give the tokens values so that they matter here.
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in vit.parameters())
    with torch.no_grad():
        for token in (vit.cls_token, vit.pos_embed, vit.register_tokens):
            token.normal_(std=0.02)
    return vit


@pytest.mark.parametrize("make_head", [lambda: MoEHead(dim=64, router_hidden=16), lambda: LinearHead(64, 8)])
def test_emotion_classifier(make_head):
    vit = tiny_vit()
    model = EmotionClassifier(vit, make_head())
    assert model.backbone is vit and model.num_layers == 2
    images = torch.randn(3, 3, 56, 56)
    model.eval()
    feats = model.features(images)
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats, vit(images)[:, 0])
    logits = model(images)
    assert logits.shape == (3, 8) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model.head(feats))
    assert model(images, return_routing=True)[0].shape == (3, 8)

    model.train()
    vit.freeze(1)
    F.cross_entropy(model(images), torch.tensor([0, 4, 7])).backward()
    for name, p in model.named_parameters():
        trainable = not name.startswith(("backbone.blocks.0.", "backbone.patch_embed", "backbone.cls_token",
                                         "backbone.pos_embed", "backbone.register_tokens"))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in vit.blocks[1].parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.head.parameters())

    layers = {name: layer for name, _, layer in model.parameter_layers()}
    assert layers["backbone.blocks.1.norm1.weight"] == 2
    assert layers["backbone.norm.weight"] == 3 and layers["head.classifier.weight"] == 3
    assert "backbone.blocks.0.norm1.weight" not in layers and "backbone.cls_token" not in layers
    assert model.layer_id("backbone.cls_token") == 0 and model.layer_id("backbone.blocks.0.attn.qkv.weight") == 1
