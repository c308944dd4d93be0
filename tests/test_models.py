"""models.py against transformers: same weights, same input, fp32, max abs difference <= 1e-4."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, Dinov2ForImageClassification, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

import hf_checkpoints as hf
from models import EmoError
from models import (ViT, ViTConfig, Wav2Vec2, Wav2Vec2Config, init_random, normalize_waveform,
                    save_hf_checkpoint)

TOLERANCE = 1e-4


def max_diff(a, b):
    return (a - b).abs().max().item()


def images(height, width, batch=2, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- ViT

@pytest.mark.parametrize("variant, height, width", [
    ("tiny", 98, 98),        # the position table's own size: no interpolation
    ("tiny", 224, 224),      # interpolated
    ("tiny", 126, 224),      # non-square
    ("registers", 224, 224),
    ("registers", 98, 70),
    ("swiglu", 224, 224),    # the giant model's MLP
    ("classifier", 224, 224),  # `dinov2.` prefix and a classification head that must be ignored
])
def test_vit_matches_transformers(tmp_path, variant, height, width):
    if variant == "registers":
        reference = hf.dinov2(registers=True)
    elif variant == "swiglu":
        reference = hf.dinov2(use_swiglu_ffn=True)
    elif variant == "classifier":
        reference = hf.dinov2(model_class=Dinov2ForImageClassification, num_labels=5)
    else:
        reference = hf.dinov2()
    ours = ViT.from_pretrained(hf.save(reference, tmp_path))
    x = images(height, width)
    with torch.no_grad():
        base = reference.dinov2 if variant == "classifier" else reference
        expected = base(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= TOLERANCE
    with torch.no_grad():  # the last block computing the CLS token alone
        assert max_diff(ours(x, cls_only=True), base(pixel_values=x).pooler_output[:, None]) <= TOLERANCE
    # With autograd on, the forward takes PyTorch's own ops rather than the fused CPU kernels.
    assert max_diff(ours.requires_grad_(True)(x), expected) <= TOLERANCE


def test_vit_large_full_config(tmp_path):
    reference = hf.dinov2(**hf.VIT_LARGE)
    ours = ViT.from_pretrained(hf.save(reference, tmp_path))
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in reference.named_parameters() if "mask_token" not in n)
    x = images(224, 224, batch=1)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (1, 257, 1024)
    assert max_diff(got, expected) <= TOLERANCE


def test_vit_training_switches(tmp_path):
    ours = ViT.from_pretrained(hf.save(hf.dinov2(num_hidden_layers=4), tmp_path), drop_path_rate=0.2)
    assert [b.drop_path_rate for b in ours.blocks] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])

    ours.freeze(2)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0.", "blocks.1."))
                   for n in trainable)
    assert any(n.startswith("blocks.2.") for n in trainable) and "norm.weight" in trainable

    # Stochastic depth is active in training only; in eval the forward is deterministic.
    x = images(56, 56)
    ours.train()
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(1)
    b = ours(x)
    assert max_diff(a, b) > 0
    ours.eval()
    assert max_diff(ours(x), ours(x)) == 0

    # Gradient checkpointing and a CLS-only last block change the work, not the CLS gradients.
    for block in ours.blocks:
        block.drop_path_rate = 0.0
    ours.train()
    grads = []
    for use_checkpointing, cls_only in ((False, False), (True, False), (False, True), (True, True)):
        ours.gradient_checkpointing = use_checkpointing
        ours.zero_grad()
        ours(x, cls_only=cls_only)[:, 0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters() if p.requires_grad]))
    assert all(max_diff(grads[0], g) <= 1e-6 for g in grads[1:])


# ----------------------------------------------------------------------------------- Wav2Vec2

def waves(lengths, seed=2):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randn(n, generator=generator)
        mask[i, :n] = 1
    return batch, mask


def assert_same_outputs(ours, reference, wave, mask=None, autograd=False):
    with torch.no_grad():
        expected = reference(wave, attention_mask=mask, output_hidden_states=True)
    with torch.set_grad_enabled(autograd):  # with autograd, PyTorch's own ops instead of fused CPU kernels
        last, hidden_states = ours.requires_grad_(autograd)(wave, attention_mask=mask)
    assert last.shape == expected.last_hidden_state.shape
    assert len(hidden_states) == len(expected.hidden_states)
    if mask is None:
        assert max_diff(last, expected.last_hidden_state) <= TOLERANCE
        for got, want in zip(hidden_states, expected.hidden_states):
            assert max_diff(got, want) <= TOLERANCE
    else:  # compare the real steps; padded steps are not meaningful in either
        steps = ours.num_steps(mask.sum(-1))
        for i, n in enumerate(steps.tolist()):
            assert max_diff(last[i, :n], expected.last_hidden_state[i, :n]) <= TOLERANCE
            for got, want in zip(hidden_states, expected.hidden_states):
                assert max_diff(got[i, :n], want[i, :n]) <= TOLERANCE


@pytest.mark.parametrize("style", ["base", "large"])
@pytest.mark.parametrize("spelling", ["parametrizations", "weight_g"])
def test_wav2vec2_matches_transformers(tmp_path, style, spelling):
    reference = hf.wav2vec2(**(hf.TINY_W2V_BASE if style == "base" else hf.TINY_W2V_LARGE))
    directory = hf.save(reference, tmp_path)
    if spelling == "weight_g":
        hf.use_weight_g_v(directory)
    ours = Wav2Vec2.from_pretrained(directory)
    wave, _ = waves([16000])
    assert_same_outputs(ours, reference, wave)
    assert_same_outputs(ours, reference, wave, autograd=True)


@pytest.mark.parametrize("style", ["base", "large"])
def test_wav2vec2_padded_batch(tmp_path, style):
    reference = hf.wav2vec2(**(hf.TINY_W2V_BASE if style == "base" else hf.TINY_W2V_LARGE))
    ours = Wav2Vec2.from_pretrained(hf.save(reference, tmp_path))
    wave, mask = waves([16000, 9000, 4321])
    assert_same_outputs(ours, reference, wave, mask)


def test_wav2vec2_ctc_checkpoint_and_full_large_config(tmp_path):
    """The ASR checkpoint layout (`wav2vec2.` prefix, lm_head) at the real large LV-60 size."""
    reference = hf.wav2vec2(model_class=Wav2Vec2ForCTC, vocab_size=32, **hf.W2V_LARGE)
    directory = hf.save(reference, tmp_path)
    hf.use_weight_g_v(directory)  # as the hub file spells it
    ours = Wav2Vec2.from_pretrained(directory)
    wave, _ = waves([16000])
    assert_same_outputs(ours, reference.wav2vec2, wave)


def test_normalize_waveform_matches_feature_extractor():
    wave, mask = waves([8000, 5000, 1234], seed=3)
    wave = wave * 3 + 0.5 * mask
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor([w[:n].numpy() for w, n in zip(wave, mask.sum(-1))], sampling_rate=16000,
                         padding=True, return_tensors="pt")
    got = normalize_waveform(wave * mask, mask)
    assert max_diff(got, expected.input_values) <= 1e-5
    assert max_diff(normalize_waveform(wave[:1, :8000]), expected.input_values[:1]) <= 1e-5


# ------------------------------------------------------------------------------------ loading

def test_load_through_hub_cache_offline(tmp_path):
    vit_reference = hf.dinov2()
    hf.put_in_hub_cache(hf.save(vit_reference, tmp_path / "vit"), "emo-test/tiny-dinov2")
    w2v_reference = hf.wav2vec2(**hf.TINY_W2V_LARGE)
    w2v_dir = hf.save(w2v_reference, tmp_path / "w2v")
    hf.use_weight_g_v(w2v_dir)
    hf.put_in_hub_cache(w2v_dir, "emo-test/tiny-wav2vec2", revision="refs/pr/5")

    x = images(224, 224)
    with torch.no_grad():
        assert max_diff(ViT.from_pretrained("emo-test/tiny-dinov2")(x),
                        vit_reference(pixel_values=x).last_hidden_state) <= TOLERANCE
    ours = Wav2Vec2.from_pretrained("emo-test/tiny-wav2vec2", revision="refs/pr/5")
    assert_same_outputs(ours, w2v_reference, waves([8000])[0])

    with pytest.raises(EmoError, match="not in the Hugging Face cache"):
        Wav2Vec2.from_pretrained("emo-test/tiny-wav2vec2")  # main was never cached
    with pytest.raises(EmoError, match="not in the Hugging Face cache"):
        ViT.from_pretrained("facebook/dinov2-large")


def test_load_sharded_and_pickle_free_bin_checkpoints(tmp_path):
    reference = hf.dinov2()
    x = images(98, 98)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state

    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    with torch.no_grad():
        assert max_diff(ViT.from_pretrained(sharded)(x), expected) <= TOLERANCE

    # A repo with only pytorch_model.bin is read with torch.load(weights_only=True).
    bin_only = hf.save(reference, tmp_path / "bin")
    torch.save(load_file(bin_only / "model.safetensors"), bin_only / "pytorch_model.bin")
    (bin_only / "model.safetensors").unlink()
    with torch.no_grad():
        assert max_diff(ViT.from_pretrained(bin_only)(x), expected) <= TOLERANCE


def test_bad_checkpoints_fail_with_one_clear_line(tmp_path):
    directory = hf.save(hf.dinov2(), tmp_path / "vit")
    weights = directory / "model.safetensors"
    good = weights.read_bytes()

    def message(load=ViT.from_pretrained, source=directory):
        with pytest.raises(EmoError) as error:
            load(source)
        text = str(error.value)
        assert "\n" not in text and str(source) in text
        return text

    weights.write_bytes(good[: len(good) // 2])
    assert "not a readable safetensors file" in message()
    weights.write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in message()
    weights.write_bytes(good)

    hf.edit_config(directory, hidden_size=96)
    text = message()
    assert "wrong shape" in text and "cls_token (1, 1, 64) (expected (1, 1, 96))" in text
    hf.edit_config(directory, hidden_size=64, num_hidden_layers=3)
    assert "missing: blocks.2." in message()
    hf.edit_config(directory, num_hidden_layers=1)
    assert "unexpected: blocks.1." in message()
    hf.edit_config(directory, num_hidden_layers=2)

    tensors = load_file(weights)
    del tensors["encoder.layer.1.norm2.weight"]
    save_file(tensors, weights)
    assert "missing: blocks.1.norm2.weight" in message()

    assert "expected a wav2vec2 config" in message(Wav2Vec2.from_pretrained)
    (directory / "config.json").write_text("{not json")
    assert "not readable JSON" in message()
    assert "does not exist" in message(source=tmp_path / "nowhere" / "model")
    assert "not a model directory" in message(source=weights.parent / "config.json")
    weights.unlink()
    (directory / "config.json").write_text("{}")
    assert "has no weights" in message()


# ------------------------------------------------------------------------------------ writing

def random_emo_model(model):
    """init_random, then the constant tensors moved off their values, as hf.randomize does."""
    init_random(model, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("variant", ["plain", "registers", "swiglu"])
def test_written_vit_checkpoint_loads_in_transformers(tmp_path, variant):
    cfg = ViTConfig(**hf.TINY_DINOV2, num_register_tokens=4 if variant == "registers" else 0,
                    use_swiglu_ffn=variant == "swiglu")
    ours = random_emo_model(ViT(cfg))
    directory = save_hf_checkpoint(ours, tmp_path / "vit")
    reference, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    x = images(126, 98)
    with torch.no_grad():
        assert max_diff(ours(x), reference.eval()(pixel_values=x).last_hidden_state) <= TOLERANCE
    loaded = ViT.from_pretrained(directory)
    assert loaded.cfg == cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("style", ["base", "large"])
def test_written_wav2vec2_checkpoint_loads_in_transformers(tmp_path, style):
    tiny = hf.TINY_W2V_BASE if style == "base" else hf.TINY_W2V_LARGE
    cfg = Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in tiny.items()})
    ours = random_emo_model(Wav2Vec2(cfg))
    directory = save_hf_checkpoint(ours, tmp_path / "w2v")
    reference, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info
    assert_same_outputs(ours, reference.eval(), waves([16000])[0])
    loaded = Wav2Vec2.from_pretrained(directory)
    assert loaded.cfg == cfg
    assert all(torch.allclose(loaded.state_dict()[k], v, atol=1e-6) for k, v in ours.state_dict().items())
