"""Real Hugging Face checkpoints with random weights, written by transformers itself (test-only)."""
import json
import shutil
from hashlib import sha1
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                          Wav2Vec2Config, Wav2Vec2Model)

TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=98, patch_size=14)
VIT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14)
TINY_W2V_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
TINY_W2V_LARGE = dict(TINY_W2V_BASE, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
W2V_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)


def randomize(model, seed=0):
    """Move the constant-initialised tensors (norms, biases, layer scales) off their initial values,
    so that a skipped or misplaced tensor cannot go unnoticed; the matrices are random already."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def dinov2(registers=False, model_class=None, seed=0, **config):
    if registers:
        cfg, cls = Dinov2WithRegistersConfig(**{**TINY_DINOV2, **config}), Dinov2WithRegistersModel
    else:
        cfg, cls = Dinov2Config(**{**TINY_DINOV2, **config}), Dinov2Model
    torch.manual_seed(seed)
    return randomize((model_class or cls)(cfg), seed)


def wav2vec2(seed=0, model_class=Wav2Vec2Model, **config):
    torch.manual_seed(seed)
    return randomize(model_class(Wav2Vec2Config(**config)), seed)


def save(model, directory):
    model.save_pretrained(directory)
    return Path(directory)


def use_weight_g_v(directory):
    """Rewrite the positional conv's weight norm in the older weight_g / weight_v spelling of hub files."""
    path = Path(directory) / "model.safetensors"
    tensors = load_file(path)
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})


def put_in_hub_cache(directory, repo_id, revision="main"):
    """Lay a local checkpoint out as huggingface-hub's cache does: blobs, a snapshot, and a ref."""
    from huggingface_hub.constants import HF_HUB_CACHE
    repo = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(directory).iterdir():
        blob = repo / "blobs" / sha1(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
