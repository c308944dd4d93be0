"""Training. Stage I: fine-tune DINOv2 with PadAug and the MoE head on face images.

    python train.py --stage 1 --data affectnet:/data/AffectNet/train_set --data rafdb:/data/RAF-DB \
        --val /data/Aff-Wild2/cropped_aligned,/data/Aff-Wild2/annotations/EXPR_Recognition_Challenge/Validation_Set
    torchrun --nproc_per_node 8 train.py --stage 1 ...      # DDP: NCCL on GPUs, gloo on CPU
    python train.py --stage 1 ... --resume                  # continue the run in --out exactly

Every default is the recipe's (RECIPE.md, Stage I). The run directory holds `last/` (weights,
optimizer, position; written every --save-every steps and each epoch, atomically), `best/` (the
weights with the best validation Macro-F1) and `log.jsonl`.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (AffWild2Frames, ImageFolderDataset, check_classes, eval_transform, make_loader,
                  train_transform)
from emo import (CLASSES, EmoError, confusion_matrix, f1_per_class, load_checkpoint, macro_f1, run,
                 save_checkpoint)
from models import EmotionClassifier, LinearHead, MoEHead, ViT


@dataclass
class Stage1Config:
    data: list = field(default_factory=list)  # "layout:folder", layout plain, affectnet or rafdb
    val: str = ""                  # "cropped_aligned,annotation_dir" (Aff-Wild2) or "layout:folder"
    val_frames_per_video: int = 50
    backbone: str = "facebook/dinov2-large"
    revision: str = None
    head: str = "moe"              # or "linear"
    out: str = "runs/stage1"
    epochs: int = 12
    batch_size: int = 64           # across all processes and accumulation steps
    accumulate: int = 1
    lr_backbone: float = 1e-5      # the last block's; block i gets lr_backbone * layer_decay ** (last - i)
    layer_decay: float = 0.85
    lr_head: float = 3e-4
    min_lr: float = 1e-7
    weight_decay: float = 0.05
    freeze_blocks: int = 8         # plus the patch embedding and the tokens
    drop_path: float = 0.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2
    clip_grad: float = 1.0
    image_size: int = 224
    crop_scale: float = 0.8        # augmentation: smallest RandomResizedCrop area, then probabilities
    jitter: float = 0.8
    grayscale: float = 0.1
    blur: float = 0.1
    padaug: float = 0.6
    erasing: float = 0.25
    workers: int = 8
    seed: int = 0
    compile: bool = False
    save_every: int = 500          # steps between mid-epoch checkpoints
    log_every: int = 20


# ------------------------------------------------------------------------------------ data

class SeededSamples(torch.utils.data.Dataset):
    """Items fetched as (epoch, index): each sample's augmentation is drawn from its own seed, so
    a resumed run sees exactly the images an uninterrupted one would, whatever the workers."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, epoch_index):
        epoch, index = epoch_index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            return self.dataset[index]


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, this process's share of it, from a given position on."""

    def __init__(self, size, seed, epoch, rank=0, world=1, start=0):
        self.size, self.seed, self.epoch, self.rank, self.world, self.start = size, seed, epoch, rank, world, start

    def order(self):
        permutation = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        usable = self.size - self.size % self.world
        return permutation[:usable][self.rank::self.world][self.start:].tolist()

    def __iter__(self):
        return ((self.epoch, index) for index in self.order())

    def __len__(self):
        return max(0, self.size // self.world - self.start)


def load_sets(cfg):
    train_sets = []
    for spec in cfg.data:
        layout, _, folder = spec.partition(":")
        if not folder:
            raise EmoError(f"--data {spec!r}: expected LAYOUT:FOLDER, e.g. affectnet:/data/AffectNet/train_set")
        transform = train_transform(cfg.image_size, cfg.crop_scale, cfg.jitter, cfg.grayscale, cfg.blur, cfg.padaug,
                                    cfg.erasing)
        train_sets.append(ImageFolderDataset(folder, layout, transform))
    if not train_sets:
        raise EmoError("no training data: pass --data LAYOUT:FOLDER (plain, affectnet or rafdb) at least once")
    train_set = torch.utils.data.ConcatDataset(train_sets)
    labels = torch.cat([s.labels for s in train_sets])
    check_classes(labels, "the training data")
    val_set = None
    if cfg.val:
        transform = eval_transform(cfg.image_size, round(cfg.image_size * 256 / 224))
        if "," in cfg.val:
            crops, annotations = cfg.val.split(",", 1)
            val_set = AffWild2Frames(crops, annotations, cfg.val_frames_per_video, transform)
        else:
            layout, _, folder = cfg.val.partition(":")
            val_set = ImageFolderDataset(folder, layout, transform)
    return train_set, labels, val_set


# ----------------------------------------------------------------------------------- model

def build_model(cfg):
    if cfg.head not in ("moe", "linear"):
        raise EmoError(f"--head must be moe or linear, got {cfg.head!r}")
    vit = ViT.from_pretrained(cfg.backbone, cfg.revision, drop_path_rate=cfg.drop_path)
    dim = vit.cfg.hidden_size
    head = MoEHead(dim, len(CLASSES)) if cfg.head == "moe" else LinearHead(dim, len(CLASSES))
    vit.freeze(cfg.freeze_blocks)
    return EmotionClassifier(vit, head)


def parameter_groups(model, cfg):
    """AdamW groups: layer-wise LR decay over the ViT blocks, the head at lr_head; no weight decay
    on biases, norms, tokens and other 1-D parameters."""
    last_block = model.num_layers - 1
    groups = {}
    for name, param, layer in model.parameter_layers():
        if name.startswith("head."):
            lr = cfg.lr_head
        else:  # layer 0: embeddings, i + 1: block i, num_layers + 1: the final norm (as the last block)
            lr = cfg.lr_backbone * cfg.layer_decay ** (last_block - min(layer - 1, last_block))
        no_decay = param.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "register_tokens"))
        key = (lr, 0.0 if no_decay else cfg.weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def set_learning_rates(optimizer, step, total_steps, min_lr):
    """Cosine from each group's base_lr to min_lr over the run, no warm-up."""
    progress = min(step / max(total_steps, 1), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = min_lr + (group["base_lr"] - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def soft_cross_entropy(logits, targets, class_weights):
    return -(targets * class_weights * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def smooth_and_mix(images, labels, cfg, step):
    """Label smoothing, then mixup with lambda ~ Beta(alpha, alpha), drawn from the step's own seed."""
    targets = F.one_hot(labels, len(CLASSES)).float() * (1 - cfg.label_smoothing) + cfg.label_smoothing / len(CLASSES)
    if cfg.mixup_alpha <= 0:
        return images, targets
    rng = np.random.default_rng([cfg.seed, step])
    lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    order = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
    return lam * images + (1 - lam) * images[order], lam * targets + (1 - lam) * targets[order]


# ----------------------------------------------------------------------------- checkpoints

def save_run_state(directory, model, optimizer, position, cfg):
    """last/: the weights, the optimizer's state and the position in the run, replaced atomically."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, state in optimizer_state["state"].items()
               for key, value in state.items()}
    tensors["rng"] = torch.get_rng_state()
    save_checkpoint(tmp, model.state_dict(), {"config": asdict(cfg), **position})
    save_checkpoint(tmp, tensors, {"param_groups": optimizer_state["param_groups"]}, name="optimizer")
    old = directory.with_name(f"{directory.name}.old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_run_state(directory, model, optimizer):
    """Restore what save_run_state wrote; returns the position (epoch, step, ...)."""
    directory = Path(directory)
    if not (directory / "model.json").exists() and directory.with_name(f"{directory.name}.old").exists():
        directory = directory.with_name(f"{directory.name}.old")  # killed between the two renames
    weights, position = load_checkpoint(directory)
    position.pop("config", None)
    model.load_state_dict(weights)
    tensors, groups = load_checkpoint(directory, name="optimizer")
    torch.set_rng_state(tensors.pop("rng"))
    state = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})
    return position


# -------------------------------------------------------------------------------- training

@torch.inference_mode()
def evaluate(model, loader, device, amp):
    model.eval()
    predictions, labels = [], []
    for images, targets in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            predictions.append(model(images.to(device, non_blocking=True)).argmax(-1).cpu())
        labels.append(targets)
    labels, predictions = torch.cat(labels), torch.cat(predictions)
    per_class = f1_per_class(confusion_matrix(labels, predictions))
    model.train()
    return {"macro_f1": macro_f1(labels, predictions), "f1": dict(zip(CLASSES, per_class.round(4).tolist()))}


def train_stage1(cfg, resume=False):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = device.type == "cuda"  # bf16 on GPU; on CPU bf16 matmuls are far slower than fp32
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if cfg.batch_size % (world * cfg.accumulate):
        raise EmoError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accumulate "
                       f"({world * cfg.accumulate})")
    micro_batch = cfg.batch_size // (world * cfg.accumulate)

    train_set, labels, val_set = load_sets(cfg)
    fingerprint = {"train": [part.fingerprint() for part in train_set.datasets],
                   "val": val_set.fingerprint() if val_set else None}
    counts = torch.bincount(labels, minlength=len(CLASSES)).float()
    class_weights = ((1 / counts) / (1 / counts).mean()).to(device)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), fused=device.type == "cuda")
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise EmoError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs

    position = {"epoch": 0, "step": 0, "best_macro_f1": -1.0, "data": fingerprint}
    has_run = (out / "last").exists() or (out / "last.old").exists()
    if resume and has_run:
        position = load_run_state(out / "last", model, optimizer)
        if position.get("data") != fingerprint:
            raise EmoError(f"--resume: the training or validation data differ from those {out} was trained on "
                           f"(see data in {out / 'last' / 'model.json'}); pass the same --data and --val")
    elif resume:
        raise EmoError(f"--resume: {out / 'last'} does not exist; start without --resume")
    elif has_run:
        raise EmoError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    step = position["step"]
    trained = DistributedDataParallel(model, device_ids=[device.index] if amp else None) if world > 1 else model
    forward = torch.compile(trained) if cfg.compile else trained
    val_loader = make_loader(val_set, micro_batch, train=False, workers=cfg.workers) if val_set and rank == 0 else None
    seeded = SeededSamples(train_set, cfg.seed)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    model.train()
    for epoch in range(position["epoch"], cfg.epochs):
        done = step - epoch * steps_per_epoch  # steps of this epoch taken before a resume
        sampler = EpochSampler(len(train_set), cfg.seed, epoch, rank, world, done * cfg.batch_size // world)
        loader = torch.utils.data.DataLoader(seeded, micro_batch, sampler=sampler, num_workers=cfg.workers,
                                             pin_memory=device.type == "cuda", drop_last=True,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        batches = iter(loader)
        bar = tqdm(range(done, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=rank != 0)
        for _ in bar:
            set_learning_rates(optimizer, step, total_steps, cfg.min_lr)
            started = time.perf_counter()
            for micro in range(cfg.accumulate):
                images, targets = next(batches)
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                images, soft = smooth_and_mix(images, targets, cfg, step * cfg.accumulate + micro)
                sync = micro == cfg.accumulate - 1 or world == 1
                with trained.no_sync() if not sync else contextlib.nullcontext():
                    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        logits = forward(images)
                    loss = soft_cross_entropy(logits, soft, class_weights) / cfg.accumulate
                    loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if rank == 0 and step % cfg.log_every == 0:
                images_per_second = cfg.batch_size / (time.perf_counter() - started)
                log.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item() * cfg.accumulate,
                                      "grad_norm": float(grad_norm), "images_per_second": images_per_second}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item() * cfg.accumulate:.3f}", img_s=f"{images_per_second:.0f}")
            if rank == 0 and step % cfg.save_every == 0 and step % steps_per_epoch:
                save_run_state(out / "last", model, optimizer, {**position, "epoch": epoch, "step": step}, cfg)
        metrics = evaluate(model, val_loader, device, amp) if val_loader is not None else None
        if rank == 0:
            position = {**position, "epoch": epoch + 1, "step": step}
            if metrics:
                log.write(json.dumps({"step": step, "epoch": epoch + 1, "val": metrics}) + "\n")
                log.flush()
                tqdm.write(f"epoch {epoch + 1}: validation Macro-F1 {metrics['macro_f1']:.4f}")
                if metrics["macro_f1"] > position["best_macro_f1"]:
                    position["best_macro_f1"] = metrics["macro_f1"]
                    save_checkpoint(out / "best", model.state_dict(), {"config": asdict(cfg), "epoch": epoch + 1,
                                                                      "metrics": metrics, "data": fingerprint})
            save_run_state(out / "last", model, optimizer, position, cfg)
        if world > 1:
            dist.barrier()
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return model


# ---------------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1,), required=True, help="1: fine-tune the image encoder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    defaults = Stage1Config()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help="(default off)")
        elif isinstance(value, list):
            parser.add_argument(flag, action="append", default=[], help="repeatable")
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value,
                                help="(default %(default)s)")
    args = vars(parser.parse_args(argv))
    args.pop("stage")  # Stage II (--stage 2) arrives with its own config
    resume = args.pop("resume")
    cfg = Stage1Config(**args)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    train_stage1(cfg, resume)


if __name__ == "__main__":
    sys.exit(run(main))
