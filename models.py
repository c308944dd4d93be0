"""The networks of emo, in plain PyTorch, and the vocabulary every other file shares (the bottom of the
import graph: models <- data <- train, infer <- emo).

    ViT         DINOv2 image encoder (small/base/large/giant, with or without registers)
    Wav2Vec2    wav2vec 2.0 speech encoder (base-style and large-LV60-style)
    RetinaFace  face detector (MobileNet-0.25 or ResNet-34 backbone), boxes and 5 landmarks
    MoEHead, LinearHead, EmotionClassifier   Stage I: a head on the ViT's CLS token
    GatedFusion, FusionEnsemble, smooth_logits, load_stage2   Stage II: fusion of per-frame features, smoothing

Each loads its checkpoint with `Model.from_pretrained(name_or_path, revision=None)`, from a local
directory or a hub repo id; the encoders compute what transformers computes for them. The classes
themselves depend only on torch: copy one into your project and build it from its config dataclass.

The shared vocabulary comes first: the 8 ABAW classes, EmoError (a problem with what the user gave
us), atomic files and checkpoints, where model weights come from, and the command lines' runner.
"""
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint

CLASSES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
NUM_CLASSES = len(CLASSES)
IGNORE_LABEL = -1  # ABAW marks frames to leave out of training and scoring with -1


class EmoError(Exception):
    """A problem with what the user gave us. Command lines print it as one line and exit with 2."""


def first_line(error):
    """An exception's message in one line, for an EmoError that names its cause (FFmpeg's errors: strerror)."""
    text = (getattr(error, "strerror", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__



# ----------------------------------------------------------------------------- checkpoint files

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; it replaces `path` only if the block completes.

    A run killed halfway leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path, tensors, metadata=None):
    """Write tensors (moved to the CPU, made contiguous) to a safetensors file, atomically."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata or {"format": "pt"})


def save_checkpoint(directory, state_dict, config, name="model"):
    """Write `<name>.safetensors` (the weights) and `<name>.json` (the config) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / f"{name}.safetensors", state_dict)
    save_json(directory / f"{name}.json", config)


def load_checkpoint(directory, name="model"):
    """Read back what save_checkpoint wrote: (state_dict, config)."""
    directory = Path(directory)
    return read_safetensors(directory / f"{name}.safetensors"), read_json(directory / f"{name}.json")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EmoError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise EmoError(f"{path} is not readable JSON ({e}); delete it and write or download it again") from None


def read_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise EmoError(f"{path} does not exist") from None
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise EmoError(f"{path} is not a readable safetensors file ({e}); "
                       "delete it and write or download it again") from None


# --------------------------------------------------------------------------------- model sources

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def model_source(name_or_path, revision=None):
    """(fetch, where) for a local model directory or a Hugging Face hub repo id: fetch(filename)
    gives the file's local path (downloaded into the hub cache if need be) or None if it is absent;
    `where` names the source in messages."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return (lambda filename: local / filename if (local / filename).is_file() else None), str(local)
    if local.exists():
        raise EmoError(f"{name_or_path} is not a model directory")
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:  # a path, not a repo id
        raise EmoError(f"{name_or_path} does not exist")
    where = f"{name_or_path}" + (f" (revision {revision})" if revision else "")
    return _hub_fetcher(str(name_or_path), revision), where


def _first_file(fetch, where, filenames, name_or_path):
    """The path of the first of `filenames` that the source has (the later ones are not downloaded)."""
    for filename in filenames:
        path = fetch(filename)
        if path is not None:
            return path
    hub = not Path(name_or_path).expanduser().is_dir()
    raise EmoError(f"{where} has no weights: looked for {', '.join(filenames)}"
                   + (" in the hub and, offline, in the Hugging Face cache" if hub else ""))


def _read_config_file(fetch, where):
    config_file = fetch("config.json")
    if config_file is None:
        raise EmoError(f"{where} has no config.json")
    return read_json(config_file)


def load_pretrained(name_or_path, revision=None):
    """(config dict, tensors) of a Hugging Face model: a local directory or a hub repo id.

    Hub files go through huggingface-hub, so its cache, HF_HOME and HF_HUB_OFFLINE=1 behave as
    users expect. Weights come from safetensors; a repo that only has `pytorch_model.bin` is read
    with torch.load(weights_only=True), which cannot run code.
    """
    fetch, where = model_source(name_or_path, revision)
    config = _read_config_file(fetch, where)
    weights_file = _first_file(fetch, where, WEIGHT_FILES, name_or_path)
    if weights_file.name.endswith(".index.json"):
        tensors = {}
        for shard in sorted(set(read_json(weights_file).get("weight_map", {}).values())):
            shard_file = fetch(shard)
            if shard_file is None:
                raise EmoError(f"{where} lists weight shard {shard} but it is missing")
            tensors.update(read_safetensors(shard_file))
        return config, tensors
    if weights_file.suffix == ".bin":
        return config, read_torch_weights(weights_file)
    return config, read_safetensors(weights_file)


def fetch_weights_file(name_or_path, filenames, revision=None):
    """Path of a weights file: `name_or_path` itself if it is a file, else the first of `filenames`
    found in that local directory or hub repo (the later ones are not downloaded)."""
    if Path(name_or_path).expanduser().is_file():
        return Path(name_or_path).expanduser()
    fetch, where = model_source(name_or_path, revision)
    return _first_file(fetch, where, filenames, name_or_path)


def read_torch_weights(path):
    """A .bin / .pth state dict through torch.load(weights_only=True), which cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmoError(f"{path} is not a readable weights file ({e})") from None


def _hub_fetcher(repo_id, revision):
    """fetch(filename) -> the file's path in the hub cache (huggingface-hub's snapshot_download fetches only
    that file, or finds it offline), or None where the repo has no such file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def fetch(filename):
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[filename]))
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise EmoError(f"cannot load {repo_id}: {first_line(e)}") from None
        except LocalEntryNotFoundError:  # offline, and the cache lacks this revision
            raise EmoError(f"cannot load {repo_id}" + (f" at revision {revision}" if revision else "")
                           + ": it is not in the Hugging Face cache and the hub cannot be reached (offline, or "
                           "HF_HUB_OFFLINE=1); download it once online, or pass a local directory") from None
        return folder / filename if (folder / filename).is_file() else None
    return fetch


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (when enabled); on the CPU a no-op: its bf16 products are slow on many CPUs."""
    device = torch.device(device)
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled and device.type == "cuda")


def torchrun_process(join=True):
    """(rank, world size, device) of this process: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) its own GPU,
    and with join it joins the process group (NCCL on GPUs, gloo on CPU); alone (0, 1, cuda or cpu)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if join and world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def resolve_device(device=None):
    """A torch.device from a --device value: None or "auto" is cuda when there is one, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EmoError(f"unknown device {device!r} ({first_line(e)}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmoError(f"--device {device} but no CUDA device is available; use --device cpu")
    return device


def run(main, argv=None):
    """Run a command line's main: an EmoError becomes one `error: ...` line and exit status 2."""
    try:
        main(argv)
    except EmoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0




# ------------------------------------------------------------------------------ building blocks

class Linear(nn.Linear):
    """nn.Linear, then exact GELU if gelu=True.

    On CPU in fp32 outside autograd the product, bias and GELU are one oneDNN call (the kernel
    torch.compile's CPU backend uses), sparing the separate passes over the output that PyTorch's
    eager ops make: about 8% of a ViT-L forward. Its weights are nn.Linear's, under the same names.
    """

    def __init__(self, in_features, out_features, bias=True, gelu=False):
        super().__init__(in_features, out_features, bias)
        self.gelu = gelu

    def forward(self, x):
        return self.compute(x, self.weight, self.bias, self.gelu)

    @staticmethod
    def compute(x, weight, bias=None, gelu=False):
        """The layer's computation with the given weights (for a convolution written as a product)."""
        if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and not torch.compiler.is_compiling()):  # inductor lowers this op only for frozen constants
            return _ONEDNN_LINEAR(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        x = F.linear(x, weight, bias)
        return F.gelu(x) if gelu else x


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def gelu(x):
    """Exact GELU, in place where autograd does not need the input: one fewer large activation
    to allocate and fault in."""
    return F.gelu(x) if x.requires_grad else torch.ops.aten.gelu_(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection, through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x, mask=None, queries=None):
        """x: (batch, tokens, dim); mask: None or bool (batch, 1, 1, tokens), True = attend to that key.
        queries=n: outputs for the first n tokens only (all tokens are still attended to)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, -1).transpose(1, 3).unbind(2)
        x = F.scaled_dot_product_attention(q[:, :, :queries], k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(batch, -1, dim))


class Mlp(nn.Module):
    """fc2(GELU(fc1(x))), or with swiglu=True fc2(SiLU(a) * b) where fc1(x) = [a, b]."""

    def __init__(self, dim, hidden, swiglu=False):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = Linear(dim, 2 * hidden if swiglu else hidden, gelu=not swiglu)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        if self.swiglu:
            gate, x = x.chunk(2, dim=-1)
            x = F.silu(gate) * x
        return self.fc2(x)


def drop_path(x, rate, training):
    """Stochastic depth: zero a whole sample's residual branch with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x * keep.bernoulli_(1 - rate).div_(1 - rate)


# ---------------------------------------------------------------------------------------- ViT

@dataclass
class ViTConfig:
    """Defaults are facebook/dinov2-large's."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: float = 4.0
    use_swiglu_ffn: bool = False     # the giant model's MLP
    patch_size: int = 14
    image_size: int = 518            # the position table covers (image_size / patch_size)^2 patches
    num_channels: int = 3
    num_register_tokens: int = 0
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0      # stochastic depth, rising linearly to this rate at the last block

    @classmethod
    def from_hf(cls, hf, **overrides):
        """From a transformers Dinov2Config / Dinov2WithRegistersConfig dict."""
        if hf.get("model_type") not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"expected a DINOv2 config (model_type dinov2), got model_type {hf.get('model_type')!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported DINOv2 activation {hf['hidden_act']!r} (emo implements gelu)")
        values = {f.name: hf[f.name] for f in fields(cls) if f.name in hf}
        values.setdefault("image_size", 224)  # transformers' default
        if hf["model_type"] == "dinov2_with_registers":
            values.setdefault("num_register_tokens", 4)
        for name in ("image_size", "patch_size"):
            if isinstance(values.get(name), (list, tuple)):
                values[name] = values[name][0]
        return cls(**{**values, **overrides})


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path_rate=0.0):
        super().__init__()
        dim = cfg.hidden_size
        hidden = int(dim * cfg.mlp_ratio)
        if cfg.use_swiglu_ffn:  # two thirds of the width, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_attention_heads, cfg.qkv_bias)
        self.ls1 = nn.Parameter(torch.full((dim,), float(cfg.layerscale_value)))
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, hidden, cfg.use_swiglu_ffn)
        self.ls2 = nn.Parameter(torch.full((dim,), float(cfg.layerscale_value)))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, first_tokens=None):
        """first_tokens=n: compute the first n output tokens only (the last block, when only CLS is used)."""
        attended = self.attn(self.norm1(x), queries=first_tokens)
        x = x[:, :first_tokens] + drop_path(attended * self.ls1, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)) * self.ls2, self.drop_path_rate, self.training)


class ViT(nn.Module):
    """DINOv2 vision transformer. vit(images) -> final-normed tokens [CLS, registers, patches].

    images: (batch, 3, H, W) normalised with the ImageNet mean/std, H and W multiples of the patch
    size; other sizes than the position table's are handled by bicubic interpolation of the table.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        registers = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        last = max(cfg.num_hidden_layers - 1, 1)
        self.blocks = nn.ModuleList(ViTBlock(cfg, cfg.drop_path_rate * i / last)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False  # recompute each block in the backward pass to save memory

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, **overrides):
        """Load a DINOv2 checkpoint; `overrides` replace config values (e.g. drop_path_rate=0.1)."""
        return from_hf_checkpoint(cls, ViTConfig, vit_state_dict_from_hf, name_or_path, revision, overrides)

    def freeze(self, num_blocks):
        """Stop training the patch embedding, tokens, position table and the first num_blocks blocks."""
        for module in (self.patch_embed, *self.blocks[:num_blocks]):
            module.requires_grad_(False)
        for token in (self.cls_token, self.pos_embed, self.register_tokens):
            if token is not None:
                token.requires_grad_(False)

    def position_embeddings(self, grid_h, grid_w):
        table = self.pos_embed
        side = math.isqrt(table.shape[1] - 1)
        if (grid_h, grid_w) == (side, side):
            return table
        patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # In fp32, as transformers does; the with-registers models resample with antialiasing.
        patches = F.interpolate(patches.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                                antialias=self.cfg.num_register_tokens > 0).to(table.dtype)
        return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, images, cls_only=False):
        """-> (batch, tokens, dim); with cls_only=True (batch, 1, dim): the last block then computes the
        CLS output alone, sparing its MLP and projections on every other token."""
        x = self.patch_embed(images)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position_embeddings(grid_h, grid_w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for i, block in enumerate(self.blocks):
            first_tokens = 1 if cls_only and i == len(self.blocks) - 1 else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, first_tokens, use_reentrant=False)
            else:
                x = block(x, first_tokens)
        return self.norm(x)


_VIT_NAMES = [  # (transformers name, emo name), for reading and writing; {i}: a block, {w}: weight or bias
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.patch_embeddings.projection.{w}", "patch_embed.{w}"),
    ("encoder.layer.{i}.attention.attention.query.{w}", "blocks.{i}.attn.q.{w}"),
    ("encoder.layer.{i}.attention.attention.key.{w}", "blocks.{i}.attn.k.{w}"),
    ("encoder.layer.{i}.attention.attention.value.{w}", "blocks.{i}.attn.v.{w}"),
    ("encoder.layer.{i}.attention.output.dense.{w}", "blocks.{i}.attn.proj.{w}"),
    ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1"),
    ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2"),
    ("encoder.layer.{i}.norm1.{w}", "blocks.{i}.norm1.{w}"),
    ("encoder.layer.{i}.norm2.{w}", "blocks.{i}.norm2.{w}"),
    ("encoder.layer.{i}.mlp.fc1.{w}", "blocks.{i}.mlp.fc1.{w}"),
    ("encoder.layer.{i}.mlp.fc2.{w}", "blocks.{i}.mlp.fc2.{w}"),
    ("encoder.layer.{i}.mlp.weights_in.{w}", "blocks.{i}.mlp.fc1.{w}"),  # the giant's SwiGLU MLP, as its hub
    ("encoder.layer.{i}.mlp.weights_out.{w}", "blocks.{i}.mlp.fc2.{w}"),  # files spell it
    ("layernorm.{w}", "norm.{w}"),
]


def vit_state_dict_from_hf(tensors):
    """emo ViT state dict from a transformers DINOv2 one (with or without the `dinov2.` prefix).

    Heads (`classifier.*`) and the pre-training mask token are left out on purpose.
    """
    state = rename_from_hf(tensors, _VIT_NAMES, prefix="dinov2.", backbone=r"(embeddings|encoder|layernorm)\.",
                           ignore=r"embeddings\.mask_token")
    return fuse_qkv(state)


# ------------------------------------------------------------------------------ Stage I heads

def init_head_weights(module):
    """Linear weights ~ normal(0, 0.02) truncated at +/- 2 std, zero biases; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SwiGLU(nn.Module):
    """out(Dropout(value(x) * SiLU(gate(x)))): the SiLU goes on `gate`, the second input projection
    of the recipe's Linear(2*dim, dim)(Dropout(Linear(dim, 2*dim)(x) * SiLU(Linear(dim, 2*dim)(x))))."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.value = Linear(dim, hidden)
        self.gate = Linear(dim, hidden)
        self.out = Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.out(self.dropout(self.value(x) * F.silu(self.gate(x))))


class ExpertBlock(nn.Module):
    """Pre-LN residual block x + DropPath(SwiGLU(LN(x)))."""

    def __init__(self, dim, hidden, dropout=0.0, drop_path_rate=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = SwiGLU(dim, hidden, dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        return x + drop_path(self.ffn(self.norm(x)), self.drop_path_rate, self.training)


class MoEHead(nn.Module):
    """Mixture-of-experts classifier on the final-normed CLS features, as the Stage I recipe's.

    x = LN(cls); weights = softmax(Linear(GELU(LN(Linear(x))))) over the experts (dense soft routing:
    every expert runs on every sample, no top-k, no auxiliary loss); each expert is
    len(drop_path_rates) ExpertBlocks of width dim with a SwiGLU of hidden width 2*dim; the
    weighted sum of the expert outputs -> LN -> Dropout(dropout) -> Linear(dim, num_classes).
    At dim 1024, 8 classes, 4 experts of 3 blocks: 75,859,724 parameters.
    """

    def __init__(self, dim=1024, num_classes=8, experts=4, blocks_per_expert=3, router_hidden=256,
                 drop_path_rates=(0.0, 0.05, 0.10), dropout=0.6, expert_dropout=0.1):
        super().__init__()
        if len(drop_path_rates) != blocks_per_expert:
            raise ValueError(f"{blocks_per_expert} blocks per expert but {len(drop_path_rates)} drop-path rates")
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Sequential(nn.Linear(dim, router_hidden), nn.LayerNorm(router_hidden), nn.GELU(),
                                    nn.Linear(router_hidden, experts))
        self.experts = nn.ModuleList(
            nn.Sequential(*(ExpertBlock(dim, 2 * dim, expert_dropout, rate) for rate in drop_path_rates))
            for _ in range(experts))
        self.out_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        init_head_weights(self)

    def forward(self, cls_features, return_routing=False):
        """cls_features: (batch, dim) -> logits (batch, num_classes), and with return_routing=True
        also the routing weights (batch, experts), positive and summing to 1 per sample."""
        x = self.norm(cls_features)
        weights = self.router(x).softmax(dim=-1)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # (batch, experts, dim)
        x = torch.einsum("be,bed->bd", weights.to(outputs.dtype), outputs)
        logits = self.classifier(self.dropout(self.out_norm(x)))
        return (logits, weights) if return_routing else logits


class LinearHead(nn.Module):
    """LN -> Dropout -> Linear, the ablation's head. The LayerNorm (norm=True) mirrors MoEHead's input
    LN, so that comparing the two isolates the experts; norm=False is a plain linear probe."""

    def __init__(self, dim, num_classes, dropout=0.0, norm=True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        init_head_weights(self)

    def forward(self, cls_features, return_routing=False):
        logits = self.classifier(self.dropout(self.norm(cls_features)))
        return (logits, None) if return_routing else logits


class EmotionClassifier(nn.Module):
    """A ViT backbone and a head on its final-normed CLS token: classifier(images) -> logits.

    For layer-wise learning-rate decay, `layer_id(name)` numbers each parameter's depth:
    0 for the patch embedding and the tokens (cls, registers, position table), i + 1 for
    backbone.blocks[i], num_layers + 1 for the final norm and the head; `parameter_layers()`
    yields (name, parameter, layer id) for the trainable ones.
    """

    def __init__(self, vit, head):
        super().__init__()
        self.backbone = vit
        self.head = head

    @property
    def num_layers(self):
        return len(self.backbone.blocks)

    def features(self, images):
        """(batch, 3, H, W) -> the final-normed CLS features (batch, dim), what Stage II extracts."""
        return self.backbone(images, cls_only=True)[:, 0]

    def forward(self, images, return_routing=False):
        return self.head(self.features(images), return_routing=return_routing)

    def layer_id(self, name):
        """Depth of the parameter `name` (as named_parameters() names it)."""
        if name.startswith("backbone.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("backbone.patch_embed.", "backbone.cls_token", "backbone.pos_embed",
                            "backbone.register_tokens")):
            return 0
        return self.num_layers + 1  # backbone.norm and the head

    def parameter_layers(self):
        for name, param in self.named_parameters():
            if param.requires_grad:
                yield name, param, self.layer_id(name)


# --------------------------------------------------------------- Stage II: gated fusion and smoothing

FUSION_MODES = ("fused", "visual", "audio")
SMOOTHING_KINDS = ("median", "mean", "gaussian", "none")
STAGE2_FORMAT = "emo-stage2/1"  # stage2.json's "format"


class GatedFusion(nn.Module):
    """The Stage II head on per-frame features: visual (N, Dv) and audio (N, Da) -> logits (N, classes).

    Each branch is L2-normalised per frame, then z-scored with the training split's statistics (the
    buffers visual_mean/std, audio_mean/std, set by set_normalization and saved in the state dict);
    in training the inputs get dropout (visual_dropout, audio_dropout). mode "fused":
    z_v = Linear(Dv, hidden)(v), z_a = Linear(Da, hidden)(a),
    g = sigmoid(Linear(hidden, hidden)(Dropout(ReLU(Linear(Dv + Da, hidden)([v; a]))))),
    z = g * z_v + (1 - g) * z_a -> LayerNorm -> Dropout -> Linear(hidden, classes).
    "visual" / "audio" (the ablations) use z = z_v or z = z_a alone and ignore the other input.
    """

    def __init__(self, visual_dim=1024, audio_dim=1024, hidden=512, num_classes=8, mode="fused",
                 visual_dropout=0.2, audio_dropout=0.25, dropout=0.2):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"mode must be one of {', '.join(FUSION_MODES)}, got {mode!r}")
        self.mode = mode
        self.visual_dropout, self.audio_dropout = visual_dropout, audio_dropout
        for branch, dim in (("visual", visual_dim), ("audio", audio_dim)):
            self.register_buffer(f"{branch}_mean", torch.zeros(dim))
            self.register_buffer(f"{branch}_std", torch.ones(dim))
        self.visual = nn.Linear(visual_dim, hidden) if mode != "audio" else None
        self.audio = nn.Linear(audio_dim, hidden) if mode != "visual" else None
        self.gate = (nn.Sequential(nn.Linear(visual_dim + audio_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                   nn.Linear(hidden, hidden)) if mode == "fused" else None)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    @torch.no_grad()
    def set_normalization(self, visual, audio, index=None, chunk=65536):
        """Set the buffers to the per-dimension mean and std of the L2-normalised features of the training
        rows: all of visual and audio (any float dtype), or the rows `index` of them. Read in chunks, so a
        million fp16 rows need no float32 copy."""
        for name, rows in (("visual", visual), ("audio", audio)):
            total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            squares = torch.zeros_like(total)
            size = len(rows) if index is None else len(index)
            for start in range(0, size, chunk):
                part = rows[start:start + chunk] if index is None else rows[index[start:start + chunk]]
                x = F.normalize(part.float(), dim=-1).double()
                total += x.sum(0)
                squares += (x * x).sum(0)
            n = max(size, 1)
            mean = total / n
            std = (squares / n - mean * mean).clamp(min=0).sqrt().clamp(min=1e-6)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std)

    def normalize(self, x, branch):
        """(x / |x| - mean) / std as x * (1 / |x|) * (1 / std) - mean / std: two passes over the rows."""
        x = x.float()
        inverse_std = getattr(self, f"{branch}_std").reciprocal()
        scale = x.norm(dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()
        x = torch.addcmul(-getattr(self, f"{branch}_mean") * inverse_std, x * scale, inverse_std)
        return F.dropout(x, getattr(self, f"{branch}_dropout"), self.training)

    def forward(self, visual, audio):
        v = self.normalize(visual, "visual") if self.mode != "audio" else None
        a = self.normalize(audio, "audio") if self.mode != "visual" else None
        if self.mode == "visual":
            z = self.visual(v)
        elif self.mode == "audio":
            z = self.audio(a)
        else:
            # Linear(Dv + Da)([v; a]) as two products on the halves of its weight: no concatenated copy
            first = self.gate[0]
            hidden = F.linear(v, first.weight[:, :v.shape[1]], first.bias) + F.linear(a, first.weight[:, v.shape[1]:])
            g = torch.sigmoid(self.gate[1:](hidden))
            z = g * self.visual(v) + (1 - g) * self.audio(a)
        return self.classifier(self.dropout(self.norm(z)))


class FusionEnsemble(nn.Module):
    """The fold models of a Stage II run; forward averages their logits."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, visual, audio):
        return torch.stack([model(visual, audio).float() for model in self.models]).mean(0)


def smooth_logits(logits, kind="median", window=101, chunk_elements=1 << 24):
    """Filter each class's logits (N, C) along time with an odd window, edges replicated.

    median, mean (box), gaussian (sigma = window / 6, cut at +/- window // 2) or none. The median
    works on unfolded windows, chunked over time so that a long video needs bounded memory.
    """
    if kind not in SMOOTHING_KINDS:
        raise ValueError(f"smoothing kind must be one of {', '.join(SMOOTHING_KINDS)}, got {kind!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the smoothing window must be a positive odd number of frames, got {window}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be (frames, classes), got shape {tuple(logits.shape)}")
    if kind == "none" or window == 1 or len(logits) == 0:
        return logits
    n, classes = logits.shape
    half = window // 2
    padded = F.pad(logits.float().T.unsqueeze(0), (half, half), mode="replicate")[0]  # (C, N + 2 * half)
    if kind == "median":
        step = max(1, chunk_elements // (classes * window))
        out = torch.cat([padded[:, start:start + step + 2 * half].unfold(1, window, 1).median(-1).values
                         for start in range(0, n, step)], dim=1)
    else:
        offsets = torch.arange(-half, half + 1, dtype=torch.float32, device=logits.device)
        weights = torch.ones_like(offsets) if kind == "mean" else torch.exp(-0.5 * (offsets / (window / 6)) ** 2)
        out = F.conv1d(padded.unsqueeze(1), (weights / weights.sum()).view(1, 1, -1))[:, 0]
    return out.T.to(logits.dtype)


# ----------------------------------------------------------------------------------- Wav2Vec2

@dataclass
class Wav2Vec2Config:
    """Defaults are transformers' (the base model's), in the order the network uses them."""
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)  # the feature extractor's convolutions
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"    # "group": GroupNorm on the first conv; "layer": LayerNorm on every conv
    hidden_size: int = 768              # the transformer encoder
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False  # True: pre-LN encoder (large LV-60); False: post-LN (base)

    @classmethod
    def from_hf(cls, hf, **overrides):
        """From a transformers Wav2Vec2Config dict."""
        if hf.get("model_type") != "wav2vec2":
            raise ValueError(f"expected a wav2vec2 config (model_type wav2vec2), got model_type {hf.get('model_type')!r}")
        for key in ("hidden_act", "feat_extract_activation"):
            if hf.get(key, "gelu") != "gelu":
                raise ValueError(f"unsupported wav2vec2 {key} {hf[key]!r} (emo implements gelu)")
        if hf.get("add_adapter") or hf.get("adapter_attn_dim"):
            raise ValueError("wav2vec2 checkpoints with adapter layers are not supported")
        values = {f.name: hf[f.name] for f in fields(cls) if f.name in hf}
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            if name in values:
                values[name] = tuple(values[name])
        if values.get("feat_extract_norm", "group") not in ("group", "layer"):
            raise ValueError(f"unsupported feat_extract_norm {values['feat_extract_norm']!r}")
        return cls(**{**values, **overrides})


class ConvLayer(nn.Module):
    """One step of the waveform feature encoder: strided Conv1d, optional GroupNorm or LayerNorm, GELU.

    Works on (batch, time, channels). The convolution runs as one matrix product over the
    unfolded windows: the channels stay last for the LayerNorm, and on CPU it beats Conv1d.
    """

    def __init__(self, in_dim, out_dim, kernel, stride, bias, norm):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride, bias=bias)
        self.norm = {"group": nn.GroupNorm(out_dim, out_dim), "layer": nn.LayerNorm(out_dim), None: None}[norm]

    def forward(self, x):
        windows = x.unfold(1, self.conv.kernel_size[0], self.conv.stride[0]).flatten(2)
        x = Linear.compute(windows, self.conv.weight.flatten(1), self.conv.bias, gelu=self.norm is None)
        if isinstance(self.norm, nn.GroupNorm):  # each channel over time
            return gelu(self.norm(x.transpose(1, 2)).transpose(1, 2))
        if isinstance(self.norm, nn.LayerNorm):
            return gelu(self.norm(x))
        return x


class EncoderLayer(nn.Module):
    """Transformer layer, post-LN (base) or pre-LN (stable layer norm, large LV-60)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        dim = cfg.hidden_size
        self.pre_norm = cfg.do_stable_layer_norm
        self.attn = Attention(dim, cfg.num_attention_heads)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, cfg.intermediate_size)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

    def forward(self, x, mask=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class Wav2Vec2(nn.Module):
    """wav2vec 2.0. w2v(wave, attention_mask) -> (last hidden state, all hidden states).

    wave: (batch, samples) mono 16 kHz, normalised per utterance (normalize_waveform); one output
    step per 320 samples (20 ms). attention_mask: (batch, samples), 1 on real samples, 0 on the
    right padding of shorter utterances. hidden_states[0] is the encoder input and
    hidden_states[i] the output of layer i, as transformers returns them.
    """

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        dims = (1, *cfg.conv_dim)
        self.conv_layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], cfg.conv_kernel[i], cfg.conv_stride[i], cfg.conv_bias,
                      norm="layer" if cfg.feat_extract_norm == "layer" else "group" if i == 0 else None)
            for i in range(len(cfg.conv_dim)))
        self.proj_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.proj = Linear(cfg.conv_dim[-1], cfg.hidden_size)
        kernel = cfg.num_conv_pos_embeddings
        self.pos_conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel, padding=kernel // 2,
                                  groups=cfg.num_conv_pos_embedding_groups)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, **overrides):
        """Load a wav2vec 2.0 checkpoint, e.g. facebook/wav2vec2-large-960h-lv60-self at revision refs/pr/5."""
        return from_hf_checkpoint(cls, Wav2Vec2Config, wav2vec2_state_dict_from_hf, name_or_path, revision, overrides)

    def num_steps(self, num_samples):
        """Output steps for a waveform of num_samples samples (an int or a tensor of lengths)."""
        for kernel, stride in zip(self.cfg.conv_kernel, self.cfg.conv_stride):
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples

    def forward(self, wave, attention_mask=None):
        x = wave[:, :, None]
        for layer in self.conv_layers:
            x = layer(x)
        x = self.proj(self.proj_norm(x))
        mask = None
        if attention_mask is not None:
            valid = torch.arange(x.shape[1], device=x.device) < self.num_steps(attention_mask.sum(-1))[:, None]
            x = x.masked_fill(~valid[..., None], 0.0)
            mask = valid[:, None, None, :]
        position = self.pos_conv(x.transpose(1, 2))
        if self.cfg.num_conv_pos_embeddings % 2 == 0:  # "same" padding of an even kernel gives one step too many
            position = position[..., :-1]
        x = x + F.gelu(position).transpose(1, 2)
        if not self.cfg.do_stable_layer_norm:
            x = self.norm(x)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        if self.cfg.do_stable_layer_norm:
            x = self.norm(x)
        return x, hidden_states


def normalize_waveform(wave, attention_mask=None, eps=1e-7):
    """Zero mean and unit variance per utterance, which the wav2vec 2.0 checkpoints expect.

    With an attention_mask the statistics come from the real samples only and padding stays 0.
    """
    if attention_mask is None:
        mean = wave.mean(-1, keepdim=True)
        var = wave.var(-1, keepdim=True, correction=0)
        return (wave - mean) / torch.sqrt(var + eps)
    weight = attention_mask.to(wave.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1)
    mean = (wave * weight).sum(-1, keepdim=True) / count
    var = ((wave - mean) ** 2 * weight).sum(-1, keepdim=True) / count
    return (wave - mean) / torch.sqrt(var + eps) * weight


_W2V_NAMES = [  # (transformers name, emo name), for reading and writing; {i}: a layer, {w}: weight or bias
    ("feature_extractor.conv_layers.{i}.conv.{w}", "conv_layers.{i}.conv.{w}"),
    ("feature_extractor.conv_layers.{i}.layer_norm.{w}", "conv_layers.{i}.norm.{w}"),
    ("feature_projection.layer_norm.{w}", "proj_norm.{w}"),
    ("feature_projection.projection.{w}", "proj.{w}"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "pos_conv.weight_g"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "pos_conv.weight_v"),
    ("encoder.pos_conv_embed.conv.weight_g", "pos_conv.weight_g"),  # as older transformers saved them
    ("encoder.pos_conv_embed.conv.weight_v", "pos_conv.weight_v"),
    ("encoder.pos_conv_embed.conv.bias", "pos_conv.bias"),
    ("encoder.layer_norm.{w}", "norm.{w}"),
    ("encoder.layers.{i}.attention.q_proj.{w}", "layers.{i}.attn.q.{w}"),
    ("encoder.layers.{i}.attention.k_proj.{w}", "layers.{i}.attn.k.{w}"),
    ("encoder.layers.{i}.attention.v_proj.{w}", "layers.{i}.attn.v.{w}"),
    ("encoder.layers.{i}.attention.out_proj.{w}", "layers.{i}.attn.proj.{w}"),
    ("encoder.layers.{i}.layer_norm.{w}", "layers.{i}.norm1.{w}"),
    ("encoder.layers.{i}.final_layer_norm.{w}", "layers.{i}.norm2.{w}"),
    ("encoder.layers.{i}.feed_forward.intermediate_dense.{w}", "layers.{i}.mlp.fc1.{w}"),
    ("encoder.layers.{i}.feed_forward.output_dense.{w}", "layers.{i}.mlp.fc2.{w}"),
]


def wav2vec2_state_dict_from_hf(tensors):
    """emo Wav2Vec2 state dict from a transformers one (with or without the `wav2vec2.` prefix).

    The CTC head, quantizer, pre-training projections and SpecAugment's mask vector are left out
    on purpose. The weight-normed positional convolution is folded into one plain weight.
    """
    state = rename_from_hf(tensors, _W2V_NAMES, prefix="wav2vec2.",
                           backbone=r"(feature_extractor|feature_projection|encoder|adapter)\.")
    if "pos_conv.weight_g" in state and "pos_conv.weight_v" in state:
        g, v = state.pop("pos_conv.weight_g"), state.pop("pos_conv.weight_v")
        state["pos_conv.weight"] = v * (g / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
    return fuse_qkv(state)


# ---------------------------------------------------------------------------------- RetinaFace

@dataclass
class RetinaFaceConfig:
    """Defaults are biubug6/Pytorch_Retinaface's MobileNet-0.25 model."""
    backbone: str = "mobilenet0.25"          # or "resnet34"
    out_channels: int = 64                   # width of the FPN, SSH modules and heads
    landmarks: bool = True                   # whether the checkpoint has the 5-landmark head
    anchors_per_location: int = 2
    min_sizes: tuple = ((16, 32), (64, 128), (256, 512))  # anchor sides in pixels, per pyramid level
    steps: tuple = (8, 16, 32)               # pyramid level strides
    variances: tuple = (0.1, 0.2)            # box encoding: centre offsets, log sizes
    channel_order: str = "bgr"               # the channel order the network was trained on (OpenCV's)
    pixel_mean: tuple = (104.0, 117.0, 123.0)  # subtracted per channel, in channel_order; no scaling


BACKBONE_CHANNELS = {"mobilenet0.25": (64, 128, 256), "resnet34": (128, 256, 512)}


def conv_bn(in_channels, out_channels, kernel=3, stride=1, groups=1, slope=None):
    """Conv (no bias), BatchNorm and, if slope is given, LeakyReLU: indices 0, 1, 2 as in the checkpoints."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope, inplace=True))
    return nn.Sequential(*layers)


def depthwise_separable(in_channels, out_channels, stride):
    """3x3 depthwise then 1x1 pointwise, each with BatchNorm and LeakyReLU(0.1), as one flat Sequential."""
    return nn.Sequential(*conv_bn(in_channels, in_channels, 3, stride, groups=in_channels, slope=0.1),
                         *conv_bn(in_channels, out_channels, 1, slope=0.1))


class MobileNetBody(nn.Module):
    """MobileNet-V1 at width 0.25; returns the stride-8, -16 and -32 feature maps."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(3, 8, 3, 2, slope=0.1), depthwise_separable(8, 16, 1),
                                    depthwise_separable(16, 32, 2), depthwise_separable(32, 32, 1),
                                    depthwise_separable(32, 64, 2), depthwise_separable(64, 64, 1))
        self.stage2 = nn.Sequential(depthwise_separable(64, 128, 2),
                                    *(depthwise_separable(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(depthwise_separable(128, 256, 2), depthwise_separable(256, 256, 1))

    def forward(self, x):
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs and a (projected where the shape changes) shortcut."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class ResNet34Body(nn.Module):
    """ResNet-34 in torchvision's layout without its classifier; returns layer2, layer3 and layer4's maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, depths = (64, 128, 256, 512), (3, 4, 6, 3)
        for i, (width, depth) in enumerate(zip(widths, depths)):
            in_channels, stride = (64, 1) if i == 0 else (widths[i - 1], 2)
            blocks = [BasicBlock(in_channels, width, stride)] + [BasicBlock(width, width, 1) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 3, 2, 1)
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class FPN(nn.Module):
    """Feature pyramid: 1x1 lateral convs, top-down nearest upsampling, 3x3 merge convs."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        slope = 0.1 if out_channels <= 64 else 0.0  # the original's rule: LeakyReLU only for the narrow model
        self.output1, self.output2, self.output3 = (conv_bn(c, out_channels, 1, slope=slope) for c in in_channels)
        self.merge1 = conv_bn(out_channels, out_channels, 3, slope=slope)
        self.merge2 = conv_bn(out_channels, out_channels, 3, slope=slope)

    def forward(self, features):
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5-like and 7x7-like branches, concatenated, ReLU."""

    def __init__(self, channels):
        super().__init__()
        slope = 0.1 if channels <= 64 else 0.0
        quarter = channels // 4
        self.conv3X3 = conv_bn(channels, channels // 2)
        self.conv5X5_1 = conv_bn(channels, quarter, slope=slope)
        self.conv5X5_2 = conv_bn(quarter, quarter)
        self.conv7X7_2 = conv_bn(quarter, quarter, slope=slope)
        self.conv7x7_3 = conv_bn(quarter, quarter)

    def forward(self, x):
        shared = self.conv5X5_1(x)  # the 7x7 branch starts from the 5x5 branch's first conv
        branches = [self.conv3X3(x), self.conv5X5_2(shared), self.conv7x7_3(self.conv7X7_2(shared))]
        return F.relu(torch.cat(branches, dim=1), inplace=True)


class AnchorHead(nn.Module):
    """1x1 conv giving `values` numbers per anchor; (batch, C, H, W) -> (batch, H*W*anchors, values)."""

    def __init__(self, in_channels, anchors, values):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(len(x), -1, self.values)


@dataclass
class Faces:
    """The faces found in one frame, best first, in frame pixels."""
    boxes: torch.Tensor      # (K, 4) x1, y1, x2, y2
    scores: torch.Tensor     # (K,)
    landmarks: torch.Tensor  # (K, 5, 2) x, y of the eyes, the nose tip and the mouth corners; NaN without the head


class RetinaFace(nn.Module):
    """RetinaFace face detector (Deng et al. 2019) in the layout of biubug6/Pytorch_Retinaface's checkpoints.

    retinaface(images) -> (box regressions (N, A, 4), (background, face) probabilities (N, A, 2),
    landmark regressions (N, A, 10)) for the A anchors; `detect` turns frames into Faces.
    """

    def __init__(self, cfg: RetinaFaceConfig):
        super().__init__()
        if cfg.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown RetinaFace backbone {cfg.backbone!r} (emo has {', '.join(BACKBONE_CHANNELS)})")
        self.cfg = cfg
        self.body = MobileNetBody() if cfg.backbone == "mobilenet0.25" else ResNet34Body()
        self.fpn = FPN(BACKBONE_CHANNELS[cfg.backbone], cfg.out_channels)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(cfg.out_channels) for _ in range(3))
        anchors = cfg.anchors_per_location
        self.ClassHead = nn.ModuleList(AnchorHead(cfg.out_channels, anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(AnchorHead(cfg.out_channels, anchors, 4) for _ in range(3))
        if cfg.landmarks:
            self.LandmarkHead = nn.ModuleList(AnchorHead(cfg.out_channels, anchors, 10) for _ in range(3))
        self._anchors = {}  # (height, width, device) -> anchors

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, backbone=None):
        """Load a checkpoint: a .safetensors or .pth file, or a local directory or hub repo holding
        model.safetensors or mobilenet0.25_Final.pth. The backbone and widths are read from the
        tensors unless `backbone` ("mobilenet0.25" or "resnet34") is given."""
        path = fetch_weights_file(name_or_path, RETINAFACE_WEIGHT_FILES, revision)
        tensors = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_weights(path)
        if not isinstance(tensors, dict):
            raise EmoError(f"{path} holds a {type(tensors).__name__}, not a state dict of RetinaFace weights")
        state = retinaface_state_dict(tensors)
        try:
            with torch.device("meta"):
                model = cls(retinaface_config_from_state(state, backbone))
        except ValueError as e:
            raise EmoError(f"{path}: {e}") from None
        return load_weights(model, state, str(path)).fuse_for_inference()

    def fuse_for_inference(self):
        """Fold each BatchNorm into the convolution before it and store the weights channels-last:
        the same detections, about 3x faster on CPU. The model is then for inference only."""
        for module in list(self.modules()):
            children = list(module.named_children())
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
                    setattr(module, norm_name, nn.Identity())
        return self.to(memory_format=torch.channels_last).eval()

    def forward(self, images):
        """images: (N, 3, H, W) float, already in the network's channel order less its pixel mean."""
        features = self.fpn(self.body(images))
        features = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), features)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        scores = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1).softmax(-1)
        if self.cfg.landmarks:
            landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        else:
            landmarks = boxes.new_full((*boxes.shape[:2], 10), float("nan"))
        return boxes, scores, landmarks

    def preprocess(self, frames):
        """uint8 RGB frames (N, H, W, 3) or (N, 3, H, W) -> the network's float input (N, 3, H, W)."""
        if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[3]):
            raise ValueError(f"expected RGB frames (N, H, W, 3) or (N, 3, H, W), got shape {tuple(frames.shape)}")
        weight = next(self.parameters())
        x = frames.to(weight.device)
        if x.shape[3] == 3:  # channels last, as decoders give them (and the reading of an ambiguous shape)
            x = x.permute(0, 3, 1, 2)
        if self.cfg.channel_order == "bgr":
            x = x.flip(1)
        mean = torch.tensor(self.cfg.pixel_mean, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
        return (x.to(weight.dtype) - mean).contiguous(memory_format=torch.channels_last)

    def anchors(self, height, width, device):
        """(A, 4) anchor boxes, centre x, centre y, width, height in pixels, in the heads' order:
        level, row, column, size. Cached per input size."""
        key = (height, width, str(device))
        if key not in self._anchors:
            levels = []
            for step, sizes in zip(self.cfg.steps, self.cfg.min_sizes):
                rows, cols = math.ceil(height / step), math.ceil(width / step)
                cy = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * step
                cx = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * step
                side = torch.tensor(sizes, dtype=torch.float32, device=device)
                shape = (rows, cols, len(sizes))
                levels.append(torch.stack([cx.view(1, -1, 1).expand(shape), cy.view(-1, 1, 1).expand(shape),
                                           side.expand(shape), side.expand(shape)], dim=-1).reshape(-1, 4))
            self._anchors[key] = torch.cat(levels)
        return self._anchors[key]

    def decode(self, boxes, landmarks, anchors):
        """Regressions -> (boxes (..., 4) x1 y1 x2 y2, landmarks (..., 5, 2)) in pixels."""
        centre_var, size_var = self.cfg.variances
        centres, sides = anchors[:, :2], anchors[:, 2:]
        box_centres = centres + boxes[..., :2] * centre_var * sides
        box_sides = sides * torch.exp(boxes[..., 2:] * size_var)
        corners = torch.cat([box_centres - box_sides / 2, box_centres + box_sides / 2], dim=-1)
        points = centres.unsqueeze(-2) + landmarks.unflatten(-1, (5, 2)) * centre_var * sides.unsqueeze(-2)
        return corners, points

    @torch.inference_mode()
    def detect(self, frames, score_threshold=0.5, nms_iou=0.4, min_size=30):
        """Faces in each of a batch of uint8 RGB frames, (N, H, W, 3) or (N, 3, H, W), in one forward.

        A candidate needs a face probability >= score_threshold and both box sides >= min_size
        pixels; overlapping candidates in a frame are merged by non-maximum suppression at nms_iou.
        Returns one Faces per frame.
        """
        from torchvision.ops import batched_nms
        x = self.preprocess(frames)
        boxes, scores, landmarks = (output.float() for output in self(x))  # decoded in fp32 whatever the model's
        boxes, landmarks = self.decode(boxes, landmarks, self.anchors(*x.shape[-2:], x.device))
        scores = scores[..., 1]
        sides = boxes[..., 2:] - boxes[..., :2]
        frame, anchor = torch.nonzero((scores >= score_threshold) & (sides.min(-1).values >= min_size), as_tuple=True)
        keep = batched_nms(boxes[frame, anchor], scores[frame, anchor], frame, nms_iou)  # by falling score
        keep = keep[torch.sort(frame[keep], stable=True).indices]  # grouped by frame, still best first
        frame, anchor = frame[keep], anchor[keep]
        counts = torch.bincount(frame, minlength=len(x)).tolist()
        return [Faces(*parts) for parts in zip(boxes[frame, anchor].split(counts), scores[frame, anchor].split(counts),
                                                landmarks[frame, anchor].split(counts))]


RETINAFACE_WEIGHT_FILES = ("model.safetensors", "mobilenet0.25_Final.pth", "pytorch_model.bin")


def retinaface_state_dict(tensors):
    """emo RetinaFace state dict from a biubug6-layout checkpoint or py-feat's.

    Takes off DataParallel's `module.` prefix, unwraps a {"state_dict": ...} training checkpoint,
    renames py-feat's heads (`ClassHead._convs.0.` -> `ClassHead.0.conv1x1.`) and resets BatchNorm's
    batch counters, which inference never reads and some checkpoints lack.
    """
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    state = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("module.")
        name = re.sub(r"^(ClassHead|BboxHead|LandmarkHead)\._convs\.(\d+)\.", r"\1.\2.conv1x1.", name)
        if not name.endswith(".num_batches_tracked"):
            state[name] = tensor
    for name in [n for n in state if n.endswith(".running_mean")]:
        state[name.replace(".running_mean", ".num_batches_tracked")] = torch.zeros((), dtype=torch.long)
    return state


def retinaface_config_from_state(state, backbone=None):
    """The RetinaFaceConfig a state dict was trained with; its shapes are checked when it loads."""
    if backbone is None:
        backbone = "resnet34" if any(n.startswith("body.layer1.") for n in state) else "mobilenet0.25"
    lateral = state.get("fpn.output1.0.weight")
    out_channels = lateral.shape[0] if lateral is not None else 64 if backbone == "mobilenet0.25" else 256
    has_heads = any(n.startswith(("ClassHead.", "BboxHead.")) for n in state)
    landmarks = any(n.startswith("LandmarkHead.") for n in state) or not has_heads
    return RetinaFaceConfig(backbone=backbone, out_channels=out_channels, landmarks=landmarks)


# ------------------------------------------------------------------------------ loading weights

def _name_pattern(template):
    """A regular expression for a name table's template: {i} an index, {w} a tensor's own name."""
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>\w+)"))


def rename(name, names, to_hf=False):
    """A tensor's name through a (transformers name, emo name) table, either way; None if no entry knows it."""
    for hf_name, emo_name in names:
        source, target = (emo_name, hf_name) if to_hf else (hf_name, emo_name)
        match = _name_pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def rename_from_hf(tensors, names, prefix, backbone, ignore=None):
    """The backbone's tensors under emo's names (the `names` table).

    Names outside the backbone (task heads and the like) are dropped; a backbone name that no
    entry knows is kept as is, so that load_weights reports it as unexpected.
    """
    state = {}
    for name, tensor in tensors.items():
        name = name.removeprefix(prefix)
        if re.match(backbone, name) and not (ignore and re.fullmatch(ignore, name)):
            state[rename(name, names) or name] = tensor
    return state


def rename_to_hf(state, names, model_name):
    """transformers' names of an emo state dict (the `names` table, its first entry that fits)."""
    hf = {}
    for name, tensor in state.items():
        hf_name = rename(name, names, to_hf=True)
        if hf_name is None:
            raise ValueError(f"no {model_name} name for the tensor {name}")
        hf[hf_name] = tensor
    return hf


def fuse_qkv(state):
    """Concatenate each attention's separate q, k and v projections into its fused qkv one."""
    for name in [n for n in state if ".attn.q." in n]:
        parts = [name.replace(".attn.q.", f".attn.{p}.") for p in "qkv"]
        if all(p in state for p in parts):
            state[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat([state.pop(p) for p in parts])
    return state


def split_qkv(state):
    """The inverse of fuse_qkv: each fused qkv projection as separate q, k and v ones."""
    state = dict(state)
    for name in [n for n in state if ".attn.qkv." in n]:
        for part, piece in zip("qkv", state.pop(name).chunk(3)):
            state[name.replace(".attn.qkv.", f".attn.{part}.")] = piece
    return state


def _config_from_hf(config_class, hf, source, overrides=None):
    try:
        return config_class.from_hf(hf, **(overrides or {}))
    except ValueError as e:  # the configs trust nothing but raise ValueError: the user's file, named here
        raise EmoError(f"{source}: {e}") from None


def from_hf_checkpoint(model_class, config_class, convert, name_or_path, revision, overrides):
    hf, tensors = load_pretrained(name_or_path, revision)
    cfg = _config_from_hf(config_class, hf, name_or_path, overrides)
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = model_class(cfg)
    return load_weights(model, convert(tensors), name_or_path)


def load_weights(model, state, source):
    """Load `state` into `model` (built on any device, even "meta"); fail with one line naming every misfit."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
                 for k in expected if k in state and state[k].shape != expected[k]]
    problems = [f"{what}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                for what, names in (("missing", missing), ("wrong shape", misshaped), ("unexpected", unexpected))
                if names]
    if problems:
        raise EmoError(f"{source} does not fit emo's {type(model).__name__}: " + "; ".join(problems))
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


# ------------------------------------------------------------ emo's checkpoints: Stage I and Stage II

def stage1_directory(stage1_dir):
    """The checkpoint directory of a Stage I run: stage1_dir itself, or its best/, else its last/."""
    directory = Path(stage1_dir)
    for candidate in (directory, directory / "best", directory / "last"):
        if (candidate / "model.json").is_file():
            return candidate
    raise EmoError(f"{stage1_dir} is not a Stage I checkpoint: no model.json in it or in its best/ or last/; "
                   "pass the --out directory of train.py --stage 1 (or its best/)")


def stage1_config(stage1_dir):
    """The train.py config a Stage I checkpoint was trained with (a dict; {} when it records none)."""
    info = read_json(stage1_directory(stage1_dir) / "model.json")
    config = info.get("config") if isinstance(info, dict) else None
    return config if isinstance(config, dict) else {}


def load_encoder(stage1_dir, device=None):
    """The Stage I EmotionClassifier of a run's best/ or last/ directory (or the run directory,
    which means its best/, else last/), in eval mode on `device`.

    The architecture comes from the saved JSON config: the backbone's config.json only (a local
    directory or the hub), as the weights file holds the whole model.
    """
    directory = stage1_directory(stage1_dir)
    state = read_safetensors(directory / "model.safetensors")
    config = stage1_config(directory)
    if not config.get("backbone"):
        raise EmoError(f"{directory / 'model.json'} has no Stage I config with a backbone; "
                       "is it a train.py checkpoint?")
    fetch, where = model_source(config["backbone"], config.get("revision"))
    vit_cfg = _config_from_hf(ViTConfig, _read_config_file(fetch, f"the Stage I backbone {where}"), where)
    heads = {"moe": MoEHead, "linear": LinearHead}
    head = config.get("head", "moe")
    if head not in heads:
        raise EmoError(f"{directory / 'model.json'}: unknown head {head!r}")
    with torch.device("meta"):
        model = EmotionClassifier(ViT(vit_cfg), heads[head](vit_cfg.hidden_size, len(CLASSES)))
    return load_weights(model, state, str(directory)).to(device or "cpu")


def read_stage2_info(ckpt_dir):
    """stage2.json of a Stage II checkpoint directory (train.py --stage 2 --out DIR), checked: the format
    this emo reads and the keys it needs."""
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        raise EmoError(f"checkpoint {ckpt} does not exist; pass --ckpt with the --out folder of train.py --stage 2 "
                       "(python emo.py demo makes a small one)")
    if not ckpt.is_dir():
        raise EmoError(f"checkpoint {ckpt} is not a folder; pass the --out folder of train.py --stage 2")
    if not (ckpt / "stage2.json").is_file():
        stage1 = (ckpt / "best").is_dir() or (ckpt / "model.safetensors").is_file()
        hint = " (that is a Stage I run; pass the Stage II one)" if stage1 else ""
        raise EmoError(f"{ckpt} is not a Stage II checkpoint: it has no stage2.json{hint}")
    info = read_json(ckpt / "stage2.json")
    if not isinstance(info, dict) or info.get("format") != STAGE2_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise EmoError(f"{ckpt / 'stage2.json'} has format {found!r}, this emo reads {STAGE2_FORMAT!r}; "
                       "train the checkpoint again with this version")
    missing = [k for k in ("encoder", "features", "fold_files") if k not in info]
    if missing:
        raise EmoError(f"{ckpt / 'stage2.json'} lacks {', '.join(missing)}; the checkpoint is incomplete")
    return info


def load_stage2(ckpt_dir, device=None, info=None):
    """A Stage II checkpoint directory -> (FusionEnsemble in eval mode, the stage2.json dict).
    info: its read_stage2_info when already read."""
    info = info or read_stage2_info(ckpt_dir)
    folder = Path(ckpt_dir)
    absent = [f for f in info["fold_files"] if not (folder / f).is_file()]
    if not info["fold_files"] or absent:
        raise EmoError(f"{ckpt_dir} is incomplete: fold file {absent[0] if absent else '(none listed)'} is missing")
    folds = []
    for name in info["fold_files"]:
        try:
            with torch.device("meta"):
                model = GatedFusion(**info["fusion"])
        except (KeyError, TypeError, ValueError) as e:
            raise EmoError(f"{ckpt_dir} does not fit this emo ({first_line(e)}); "
                           "train it again with this version's train.py --stage 2") from None
        folds.append(load_weights(model, read_safetensors(folder / name), folder / name))
    return FusionEnsemble(folds).to(device).eval(), info


# ------------------------------------------------------------------- writing Hugging Face checkpoints

def vit_state_dict_to_hf(state, swiglu=False):
    """transformers DINOv2 tensors from an emo ViT state dict: the inverse of vit_state_dict_from_hf."""
    names = sorted(_VIT_NAMES, key=lambda entry: ".weights_" not in entry[0]) if swiglu else _VIT_NAMES
    return rename_to_hf(split_qkv(state), names, "DINOv2")


def wav2vec2_state_dict_to_hf(state):
    """transformers Wav2Vec2Model tensors from an emo Wav2Vec2 state dict: the inverse of
    wav2vec2_state_dict_from_hf. The positional convolution goes back into its weight-norm form
    (g = the norm over dims 0 and 1, v = the weight), spelled as current transformers saves it."""
    state = split_qkv(state)
    if "pos_conv.weight" in state:
        weight = state.pop("pos_conv.weight")
        state["pos_conv.weight_g"] = torch.linalg.vector_norm(weight, dim=(0, 1), keepdim=True)
        state["pos_conv.weight_v"] = weight
    return rename_to_hf(state, _W2V_NAMES, "wav2vec2")


def hf_config(model):
    """The transformers config.json dict of an emo ViT or Wav2Vec2."""
    values = {f.name: getattr(model.cfg, f.name) for f in fields(model.cfg)}
    if isinstance(model, ViT):
        registers = values["num_register_tokens"] > 0
        values.update(model_type="dinov2_with_registers" if registers else "dinov2", hidden_act="gelu",
                      architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
                      initializer_range=0.02, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if float(values["mlp_ratio"]).is_integer():  # as the hub configs have it (transformers checks the type)
            values["mlp_ratio"] = int(values["mlp_ratio"])
        if not registers:
            values.pop("num_register_tokens")
        return values
    if isinstance(model, Wav2Vec2):
        values.update(model_type="wav2vec2", architectures=["Wav2Vec2Model"], hidden_act="gelu",
                      feat_extract_activation="gelu", num_feat_extract_layers=len(values["conv_dim"]),
                      conv_dim=list(values["conv_dim"]), conv_kernel=list(values["conv_kernel"]),
                      conv_stride=list(values["conv_stride"]))
        return values
    raise TypeError(f"no Hugging Face format for a {type(model).__name__}")


def save_hf_checkpoint(model, directory):
    """Write an emo ViT or Wav2Vec2 as a Hugging Face checkpoint directory (config.json and
    model.safetensors with transformers' tensor names), which both emo's from_pretrained and
    transformers' from_pretrained load. Returns the directory."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, ViT):
        tensors = vit_state_dict_to_hf(state, model.cfg.use_swiglu_ffn)
        tensors["embeddings.mask_token"] = torch.zeros(1, model.cfg.hidden_size)  # unused, but DINOv2 has it
    else:
        tensors = wav2vec2_state_dict_to_hf(state)
        tensors["masked_spec_embed"] = torch.zeros(model.cfg.hidden_size)  # SpecAugment's, unused
    config = hf_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / "model.safetensors", tensors)
    save_json(directory / "config.json", config)
    return directory


def init_random(model, seed=0, std=0.02):
    """Random weights as transformers initialises DINOv2 / wav2vec 2.0 for training from scratch:
    linear and patch weights ~ N(0, std), zero biases, unit norms, layer scales at their config value,
    the wav2vec2 convolutions He-normal. For demos and tests; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor, scale):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(module.weight, std)
            elif isinstance(module, nn.Conv1d):
                normal(module.weight, math.sqrt(2 / module.weight[0].numel()))
            else:
                continue
            if module.bias is not None:
                module.bias.zero_()
        if isinstance(model, ViT):
            for token in (model.cls_token, model.pos_embed, model.register_tokens):
                if token is not None:
                    normal(token, std)
            for block in model.blocks:
                block.ls1.fill_(model.cfg.layerscale_value)
                block.ls2.fill_(model.cfg.layerscale_value)
    return model.eval()
