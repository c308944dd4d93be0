r"""Training. Stage I: fine-tune DINOv2 with PadAug and the MoE head on face images; Stage II: gated fusion.

    python train.py --stage 1 --data affectnet:/data/AffectNet/train_set --data rafdb:/data/RAF-DB \
        --val /data/Aff-Wild2/cropped_aligned,/data/Aff-Wild2/annotations/EXPR_Recognition_Challenge/Validation_Set
    torchrun --nproc_per_node 8 train.py --stage 1 ...      # DDP: NCCL on GPUs, gloo on CPU
    python train.py --stage 1 ... --resume                  # continue the run in --out exactly

    python train.py --stage 2 --folds 5 --annotations /data/Aff-Wild2/annotations --videos /data/Aff-Wild2/videos \
        --encoder runs/stage1/best --out runs/stage2           # no --folds: Train -> Validation
    torchrun --nproc_per_node 8 train.py --stage 2 ...      # the feature extraction shared by 8 processes

Every default is the recipe's (RECIPE.md, Stage I / Stage II). A Stage I run directory holds `last/` (weights,
optimizer, position; written every --save-every steps and each epoch, atomically), `best/` (the
weights with the best validation Macro-F1) and `log.jsonl`. Stage II writes stage2.json (what
infer.py needs), fold<k>.safetensors (the fold models, ensembled by averaging logits) and the ablation
report.md / report.json; each fold's epoch and smoothing are chosen on its training videos only.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import re
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

import data
from data import (AffWild2Frames, ImageFolderDataset, check_classes, confusion_matrix, eval_transform, f1_per_class,
                  macro_f1, make_loader, read_annotation,
                  train_transform)
from models import (CLASSES, FUSION_MODES, SMOOTHING_KINDS, STAGE2_FORMAT, EmoError, EmotionClassifier,
                    GatedFusion, LinearHead, MoEHead, RetinaFace, ViT, atomic_path, autocast, load_checkpoint,
                    resolve_device, run, save_checkpoint, save_json, save_safetensors, smooth_logits, stage1_config,
                    torchrun_process)


@dataclass
class Stage1Config:
    data: list = field(default_factory=list)  # "layout:folder", layout plain, affectnet or rafdb
    val: str = ""                  # "cropped_aligned,annotation_dir" (Aff-Wild2) or "layout:folder"
    val_frames_per_video: int = 50
    backbone: str = "facebook/dinov2-large"
    revision: str = None           # of --backbone on the hub; default the newest
    head: str = "moe"              # moe or linear
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
    compile: bool = False          # torch.compile the model
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

    def __iter__(self):
        permutation = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        usable = self.size - self.size % self.world
        share = permutation[:usable][self.rank::self.world][self.start:].tolist()
        return ((self.epoch, index) for index in share)

    def __len__(self):
        return max(0, self.size // self.world - self.start)


def load_sets(cfg):
    transform = train_transform(cfg.image_size, cfg.crop_scale, cfg.jitter, cfg.grayscale, cfg.blur, cfg.padaug,
                                cfg.erasing)
    train_sets = []
    for spec in cfg.data:
        layout, _, folder = spec.partition(":")
        if not folder:
            raise EmoError(f"--data {spec!r}: expected LAYOUT:FOLDER, e.g. affectnet:/data/AffectNet/train_set")
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


def inverse_frequency_weights(labels):
    """Per-class loss weights 1 / count, normalised to mean 1 over the classes present (0 for absent ones)."""
    counts = torch.bincount(labels, minlength=len(CLASSES)).float()
    inverse = torch.where(counts > 0, 1 / counts, 0.0)
    return inverse / inverse[counts > 0].mean()


def mix(images, labels, cfg, step):
    """Mixup with lambda ~ Beta(alpha, alpha), drawn from the step's own seed: (images, class probabilities).
    The loss smooths the mixed targets (smoothing is linear, so before or after mixing is the same)."""
    targets = F.one_hot(labels, len(CLASSES)).float()
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
def evaluate(model, loader, device, amp, world=1):
    """Validation Macro-F1 and per-class F1. Under DDP each process predicts its share of the set
    (every world-th image) and the shares are gathered."""
    model.eval()
    predictions, labels = [], []
    for images, targets in loader:
        with autocast(device, amp):
            predictions.append(model(images.to(device, non_blocking=True)).argmax(-1).cpu())
        labels.append(targets)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    predictions = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, (labels, predictions))
        labels, predictions = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
    per_class = f1_per_class(confusion_matrix(labels, predictions))
    model.train()
    return {"macro_f1": macro_f1(labels, predictions), "f1": dict(zip(CLASSES, per_class.round(4).tolist())),
            "images": len(labels)}


def start_position(out, resume, model, optimizer, fingerprint):
    """Where the run in `out` stands: its last/ state loaded into model and optimizer with --resume, else a
    new run's start (and an error for a run that exists without --resume, or --resume without one)."""
    has_run = (out / "last").exists() or (out / "last.old").exists()
    if resume and has_run:
        position = load_run_state(out / "last", model, optimizer)
        if position.get("data") != fingerprint:
            raise EmoError(f"--resume: the training or validation data differ from those {out} was trained on "
                           f"(see data in {out / 'last' / 'model.json'}); pass the same --data and --val")
        return position
    if resume:
        raise EmoError(f"--resume: {out / 'last'} does not exist; start without --resume")
    if has_run:
        raise EmoError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return {"epoch": 0, "step": 0, "best_macro_f1": -1.0, "data": fingerprint}


def accumulate_gradients(trained, forward, batches, class_weights, cfg, step, device, amp, world):
    """The gradients of one optimizer step over cfg.accumulate micro-batches, synchronised across processes
    on the last one only. Returns the last micro-batch's loss."""
    for micro in range(cfg.accumulate):
        images, labels = (t.to(device, non_blocking=True) for t in next(batches))
        images, soft = mix(images, labels, cfg, step * cfg.accumulate + micro)
        last = micro == cfg.accumulate - 1 or world == 1
        with trained.no_sync() if not last else contextlib.nullcontext():
            with autocast(device, amp):
                logits = forward(images)
            loss = F.cross_entropy(logits.float(), soft, class_weights, label_smoothing=cfg.label_smoothing)
            (loss / cfg.accumulate).backward()
    return loss


def train_stage1(cfg, resume=False):
    rank, world, device = torchrun_process()
    amp = device.type == "cuda"  # bf16 on GPU; on CPU bf16 matmuls are far slower than fp32
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % (world * cfg.accumulate):
        raise EmoError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accumulate "
                       f"({world * cfg.accumulate})")
    micro_batch = cfg.batch_size // (world * cfg.accumulate)

    train_set, labels, val_set = load_sets(cfg)
    fingerprint = {"train": [part.fingerprint() for part in train_set.datasets],
                   "val": val_set.fingerprint() if val_set else None}
    class_weights = inverse_frequency_weights(labels).to(device)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), fused=device.type == "cuda")
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise EmoError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs

    position = start_position(out, resume, model, optimizer, fingerprint)
    step = position["step"]
    trained = DistributedDataParallel(model, device_ids=[device.index] if amp else None) if world > 1 else model
    forward = torch.compile(trained) if cfg.compile else trained
    val_share = torch.utils.data.Subset(val_set, range(rank, len(val_set), world)) if val_set else None
    val_loader = make_loader(val_share, micro_batch, train=False, workers=cfg.workers) if val_set else None
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
            loss = accumulate_gradients(trained, forward, batches, class_weights, cfg, step, device, amp, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if rank == 0 and step % cfg.log_every == 0:
                images_per_second = cfg.batch_size / (time.perf_counter() - started)
                print(json.dumps({"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": float(grad_norm),
                                  "images_per_second": images_per_second}), file=log, flush=True)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{images_per_second:.0f}")
            if rank == 0 and step % cfg.save_every == 0 and step % steps_per_epoch:
                save_run_state(out / "last", model, optimizer, {**position, "epoch": epoch, "step": step}, cfg)
        metrics = evaluate(model, val_loader, device, amp, world) if val_loader is not None else None
        if rank == 0:
            position = {**position, "epoch": epoch + 1, "step": step}
            if metrics:
                print(json.dumps({"step": step, "epoch": epoch + 1, "val": metrics}), file=log, flush=True)
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


# ================================================================================ Stage II

@dataclass
class Stage2Config:
    annotations: str = ""          # EXPR_Recognition_Challenge folder with Train_Set/ and Validation_Set/
    videos: str = ""               # raw videos (searched recursively: batch1/, batch2/ ...): features from them
    cropped_aligned: str = ""      # or from Aff-Wild2's aligned crops (<id>/00001.jpg), with audio from --videos
    features: str = ""             # folder of <id>.features.safetensors; default <out>/features
    out: str = "runs/stage2"
    encoder: str = "runs/stage1/best"  # the Stage I run (its best/ or last/) that encodes the faces
    audio_model: str = "facebook/wav2vec2-large-960h-lv60-self"
    audio_revision: str = "refs/pr/5"
    detector: str = "py-feat/retinaface"  # RetinaFace weights: hub id, folder or file
    boxes: str = ""                # or your own detector's face boxes: a folder of <video>.json (data.read_boxes)
    stride: int = 1                # encode every stride-th face frame, interpolate the others
    folds: int = 0                 # K >= 2: cross-validation on Train + Validation; 0: Train -> Validation
    mode: str = "fused"            # the mode of the saved fold models
    modes: str = "visual,audio,fused"  # the ablation: each is selected, trained and reported
    epochs: int = 20
    batch_size: int = 4096
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    hidden: int = 512
    dropout: float = 0.2
    visual_dropout: float = 0.2
    audio_dropout: float = 0.25
    class_weights: str = "inverse"  # inverse class frequency normalised to mean 1, or none
    smoothing_kinds: str = "median,mean,gaussian"
    smoothing_windows: str = "11,25,51,101,151,201"
    inner_folds: int = 5           # 1/inner_folds of the training videos select the epoch and smoothing
    seed: int = 0
    device: str = None             # default: cuda if available, else cpu


def check_stage2_config(cfg):
    """(the modes to train, the (kind, window) smoothing candidates); ("none", 1) always competes."""
    modes = list(dict.fromkeys(split_list(cfg.modes) + [cfg.mode]))
    for mode in modes:
        if mode not in FUSION_MODES:
            raise EmoError(f"--modes / --mode: {mode!r} is not one of {', '.join(FUSION_MODES)}")
    kinds = split_list(cfg.smoothing_kinds)
    for kind in kinds:
        if kind not in SMOOTHING_KINDS:
            raise EmoError(f"--smoothing-kinds: {kind!r} is not one of {', '.join(SMOOTHING_KINDS)}")
    try:
        windows = [int(w) for w in split_list(cfg.smoothing_windows)]
    except ValueError:
        raise EmoError(f"--smoothing-windows must be odd numbers of frames, e.g. 25,51,101; "
                       f"got {cfg.smoothing_windows!r}") from None
    if any(w < 1 or w % 2 == 0 for w in windows):
        raise EmoError(f"--smoothing-windows must be positive odd numbers of frames, got {cfg.smoothing_windows!r}")
    if cfg.folds < 0 or cfg.folds == 1:
        raise EmoError(f"--folds must be 0 (Train -> Validation) or at least 2, got {cfg.folds}")
    if cfg.inner_folds < 2:
        raise EmoError(f"--inner-folds must be at least 2, got {cfg.inner_folds}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise EmoError(f"--epochs and --batch-size must be positive, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.class_weights not in ("inverse", "none"):
        raise EmoError(f"--class-weights must be inverse or none, got {cfg.class_weights!r}")
    smoothed = [(kind, window) for kind in kinds if kind != "none" for window in windows if window > 1]
    return modes, [("none", 1)] + smoothed


def split_list(text):
    return [item.strip() for item in str(text).split(",") if item.strip()]


# ------------------------------------------------------------------------------ Stage II data

def annotation_root(path):
    root = Path(path)
    if not str(path) or not root.is_dir():
        raise EmoError(f"--annotations {path!r} is not a folder; pass the EXPR_Recognition_Challenge folder "
                       "that holds Train_Set/ and Validation_Set/")
    for name in ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"):
        if (root / name).is_dir():
            return root / name
    return root


def read_annotations(path):
    """{"Train_Set": {id: labels}, "Validation_Set": {id: labels}} from an EXPR challenge folder."""
    root = annotation_root(path)
    splits = {}
    for split in ("Train_Set", "Validation_Set"):
        splits[split] = {f.stem: read_annotation(f) for f in sorted((root / split).glob("*.txt"))}
    if not any(splits.values()):
        raise EmoError(f"no annotations in {root}: expected Train_Set/<id>.txt and Validation_Set/<id>.txt")
    return splits


def stage2_features(cfg, ids):
    """{annotation id: feature file} for each of `ids`.

    With --videos (or --cropped-aligned) the features are extracted first, or brought up to date
    (data.extract_features: a file is skipped while its inputs are unchanged), sharded across the
    processes under torchrun; without, the files must already be in --features.
    """
    cfg.features = cfg.features or str(Path(cfg.out) / "features")
    if cfg.videos or cfg.cropped_aligned:
        extract_stage2_features(cfg, ids)
    if not Path(cfg.features).is_dir():
        raise EmoError(f"--features {cfg.features!r} is not a folder; extract the per-frame features first "
                       "(one <id>.features.safetensors per annotation id)")
    paths = {i: data.features_path(cfg.features, i) for i in ids}
    missing = [i for i, path in paths.items() if not path.is_file()]
    if missing:
        raise EmoError(f"{len(missing)} of {len(ids)} feature files are missing in {cfg.features} "
                       f"(e.g. {paths[missing[0]].name}); extract the features first")
    return paths


def extract_stage2_features(cfg, ids):
    if not cfg.encoder:
        raise EmoError("--encoder is needed to extract features: pass the Stage I run (e.g. runs/stage1/best)")
    videos = data.find_videos(cfg.videos) if cfg.videos else None
    _, world, device = torchrun_process()
    detector = None if cfg.cropped_aligned or cfg.boxes else RetinaFace.from_pretrained(cfg.detector).to(device)
    # faces are encoded at the size the encoder was trained at (the recipe's 224, resized from 256)
    size = int(stage1_config(cfg.encoder).get("image_size", 224))
    feature_cfg = data.FeatureConfig(stride=cfg.stride, crop_size=size, crop_resize=round(size * 256 / 224))
    annotation_dirs = [annotation_root(cfg.annotations) / split for split in ("Train_Set", "Validation_Set")]
    for annotation_dir in annotation_dirs:  # the aligned-crop variant reads the frame count from the annotation
        split_ids = [i for i in ids if (annotation_dir / f"{i}.txt").is_file()]
        data.extract_features(split_ids, videos, cfg.features, cfg.encoder,
                              cfg.audio_model if cfg.audio_model != "none" else None, detector,
                              feature_cfg, audio_revision=cfg.audio_revision,
                              cropped_aligned=cfg.cropped_aligned or None, annotation_dir=annotation_dir,
                              boxes=cfg.boxes or None)
    if world > 1:
        dist.barrier()  # every rank's share is written before rank 0 reads them all


def read_features(path):
    """(visual, audio) fp16 rows of one feature file."""
    features = data.load_features(path)
    if features is None:
        raise EmoError(f"{path} is not a readable feature file; delete it and extract the features again")
    visual, audio = features.visual, features.audio
    if visual.ndim != 2 or audio.ndim != 2 or len(visual) != len(audio):
        raise EmoError(f"{path}: visual {tuple(visual.shape)} and audio {tuple(audio.shape)} are not "
                       "(frames, dim) of the same length; delete it and extract the features again")
    return visual.half(), audio.half()


def feature_settings(path):
    """The feature settings a feature file was extracted with (for stage2.json), or {}."""
    key = json.loads(data.stored_key(path) or "{}")
    return key.get("features", {}) if isinstance(key, dict) else {}


@dataclass
class FrameRows:
    """The frames of many annotation ids, concatenated in id and frame order."""
    visual: torch.Tensor   # (N, Dv) fp16
    audio: torch.Tensor    # (N, Da) fp16
    labels: torch.Tensor   # (N,) long, -1 = not scored
    spans: dict            # id -> (start, end)

    def index(self, ids, valid_only=True):
        """Row indices of `ids`' frames (those with a label when valid_only)."""
        parts = [torch.arange(*self.spans[i]) for i in ids]
        rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return rows[self.labels[rows] >= 0] if valid_only else rows


def load_rows(paths, labels):
    """All frames of the ids in `labels` in memory; features and labels cut to the shorter length."""
    visual, audio, frame_labels, spans, start, mismatched = [], [], [], {}, 0, 0
    for i in tqdm(sorted(labels), desc="features", unit="id", leave=False):
        v, a = read_features(paths[i])
        if visual and (v.shape[1] != visual[0].shape[1] or a.shape[1] != audio[0].shape[1]):
            raise EmoError(f"{paths[i]} has features of {v.shape[1]}+{a.shape[1]} dims, other files "
                           f"{visual[0].shape[1]}+{audio[0].shape[1]}: extract all with one configuration")
        n = min(len(v), len(labels[i]))
        mismatched += len(v) != len(labels[i])
        visual.append(v[:n])
        audio.append(a[:n])
        frame_labels.append(labels[i][:n])
        spans[i] = (start, start + n)
        start += n
    if mismatched:
        print(f"warning: {mismatched} ids have a feature count other than their label count; "
              "the longer one was cut", file=sys.stderr)
    if not visual:
        raise EmoError("no annotation ids to train on")
    return FrameRows(torch.cat(visual), torch.cat(audio), torch.cat(frame_labels), spans)


# ----------------------------------------------------------------------------------- folds

def assign_folds(labels, k, seed=0, class_weight=1.0):
    """{id: fold} with the ids of one video in one fold, folds balanced in labelled frames and class ratios.

    Greedy, deterministic given the seed: videos in decreasing size (ties in seeded order) each go to
    the fold where the L1 distance of (frames, per-class frames) from the per-fold targets shrinks
    most; class terms are relative to the class's target, so that rare classes count as much.
    """
    videos = {}
    for annotation_id, y in labels.items():
        y = torch.as_tensor(y)
        counts = torch.bincount(y[y >= 0], minlength=len(CLASSES)).double().numpy()
        entry = videos.setdefault(data.split_annotation_id(annotation_id)[0], [[], np.zeros(len(CLASSES))])
        entry[0].append(annotation_id)
        entry[1] += counts
    if len(videos) < k:
        raise EmoError(f"{k} folds need at least {k} videos, there are {len(videos)}: lower --folds")
    names = sorted(videos)
    tie_order = np.random.default_rng(seed).permutation(len(names))
    order = sorted(range(len(names)), key=lambda j: (-videos[names[j]][1].sum(), tie_order[j]))
    class_target = sum(v[1] for v in videos.values()) / k
    size_target = class_target.sum()
    sizes, classes = np.zeros(k), np.zeros((k, len(CLASSES)))
    folds = {}
    for j in order:
        ids, counts = videos[names[j]]
        gain_size = (np.abs(sizes + counts.sum() - size_target) - np.abs(sizes - size_target)) / max(size_target, 1)
        gain_class = ((np.abs(classes + counts - class_target) - np.abs(classes - class_target))
                      / np.maximum(class_target, 1)).mean(1)
        cost = gain_size + class_weight * gain_class
        fold = int(min(range(k), key=lambda f: (round(cost[f], 12), sizes[f], f)))
        sizes[fold] += counts.sum()
        classes[fold] += counts
        folds.update({i: fold for i in ids})
    empty = [f for f in range(k) if sizes[f] == 0]
    if empty:
        raise EmoError(f"fold {empty[0]} of {k} has no labelled frames: lower --folds or add annotated videos")
    return folds


# ------------------------------------------------------------------------------- training

def fusion_kwargs(cfg, rows, mode):
    return {"visual_dim": rows.visual.shape[1], "audio_dim": rows.audio.shape[1], "hidden": cfg.hidden,
            "num_classes": len(CLASSES), "mode": mode, "visual_dropout": cfg.visual_dropout,
            "audio_dropout": cfg.audio_dropout, "dropout": cfg.dropout}


@torch.inference_mode()
def predict_rows(model, rows, index, device, chunk=65536):
    """float32 logits (len(index), classes) on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(index), chunk):
        part = index[start:start + chunk]
        with autocast(device):
            out.append(model(rows.visual[part].to(device), rows.audio[part].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES))


def fit_fusion(rows, train_index, kwargs, cfg, device, seed, stop_after=None, on_epoch=None, max_steps=None):
    """Train a GatedFusion on the rows `train_index` (labelled frames): AdamW, per-step cosine over
    cfg.epochs from lr to min_lr, class-weighted cross-entropy, random-permutation batches straight from
    the in-memory tensors. Stops after `stop_after` epochs (the schedule stays cfg.epochs long);
    on_epoch(epoch, model) runs after each."""
    if len(train_index) == 0:
        raise EmoError("a training split has no labelled frames")
    torch.manual_seed(seed)
    model = GatedFusion(**kwargs)
    # on a GPU the training rows move there once (a million 1024+1024 fp16 rows: 4 GB); on the CPU
    # batches are gathered from the shared tensors, with no copy of the split
    on_device = device.type == "cuda"
    if on_device:
        chunks = train_index.split(65536)
        visual, audio = (torch.cat([x[chunk].to(device) for chunk in chunks]) for x in (rows.visual, rows.audio))
        model.set_normalization(visual, audio)
    else:
        visual, audio = rows.visual, rows.audio
        model.set_normalization(visual, audio, index=train_index)
    model.to(device)
    labels = rows.labels[train_index].to(device)
    weights = inverse_frequency_weights(labels) if cfg.class_weights == "inverse" else None
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "base_lr": cfg.lr}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=on_device)
    n = len(train_index)
    total_steps, step = math.ceil(n / cfg.batch_size) * cfg.epochs, 0
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(stop_after or cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            rows_batch = batch if on_device else train_index[batch]
            set_learning_rates(optimizer, step, total_steps, cfg.min_lr)
            with autocast(device, on_device):
                logits = model(visual[rows_batch], audio[rows_batch])
            loss = F.cross_entropy(logits.float(), labels[batch], weight=weights)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if max_steps and step >= max_steps:
                return model.eval()
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
    return model.eval()


def video_logits(model, rows, ids, device):
    """{id: logits of all its frames, in frame order}."""
    logits = predict_rows(model, rows, rows.index(ids, valid_only=False), device)
    return dict(zip(ids, logits.split([rows.spans[i][1] - rows.spans[i][0] for i in ids])))


def scores(rows, per_id, candidates, device=None):
    """Macro-F1 over the labelled frames for each (kind, window): smoothing runs per id over all frames."""
    labels = torch.cat([rows.labels[slice(*rows.spans[i])] for i in per_id])
    per_id = {i: logits.to(device) for i, logits in per_id.items()}
    result = {}
    for kind, window in candidates:
        predictions = torch.cat([smooth_logits(logits, kind, window).argmax(-1) for logits in per_id.values()])
        result[(kind, window)] = macro_f1(labels, predictions.cpu())
    return result


def select_and_train(rows, train_ids, mode, cfg, device, candidates, seed):
    """Choose the epoch and the smoothing on an inner split of the training ids (by video), then retrain
    on all training ids for the chosen number of epochs. Nothing outside train_ids is read."""
    videos = len({data.split_annotation_id(i)[0] for i in train_ids})
    if videos < cfg.inner_folds:
        raise EmoError(f"choosing the epoch and smoothing needs at least --inner-folds {cfg.inner_folds} "
                       f"training videos, there are {videos}: lower --inner-folds or --folds")
    inner = assign_folds({i: rows.labels[slice(*rows.spans[i])] for i in train_ids}, cfg.inner_folds, seed)
    select_ids = sorted(i for i in train_ids if inner[i] == 0)
    fit_ids = sorted(i for i in train_ids if inner[i] != 0)
    kwargs = fusion_kwargs(cfg, rows, mode)
    curve, best = [], {"f1": -1.0}

    def on_epoch(epoch, model):
        per_id = video_logits(model, rows, select_ids, device)
        f1 = scores(rows, per_id, [("none", 1)])[("none", 1)]
        curve.append(f1)
        if f1 > best["f1"]:
            best.update(f1=f1, epoch=epoch, per_id=per_id)

    fit_fusion(rows, rows.index(fit_ids), kwargs, cfg, device, seed, on_epoch=on_epoch)
    smoothing_scores = scores(rows, best["per_id"], candidates, device)
    kind, window = max(candidates, key=lambda c: smoothing_scores[c])  # first best: none, then small windows
    model = fit_fusion(rows, rows.index(sorted(train_ids)), kwargs, cfg, device, seed + 1, stop_after=best["epoch"])
    selection = {"epoch": best["epoch"], "smoothing": {"kind": kind, "window": window},
                 "inner_ids": select_ids, "inner_curve": [round(f, 5) for f in curve],
                 "inner_smoothing": {f"{k}:{w}": round(f, 5) for (k, w), f in smoothing_scores.items()}}
    return model, selection


def protocol(cfg, splits):
    """[(name, training ids, reported ids)]: K folds of Train + Validation by video, or Train -> Validation."""
    if cfg.folds == 0:
        if not splits["Train_Set"] or not splits["Validation_Set"]:
            raise EmoError("without --folds, the annotations need both Train_Set/ and Validation_Set/ "
                           f"(found {len(splits['Train_Set'])} and {len(splits['Validation_Set'])} ids)")
        return [("validation", sorted(splits["Train_Set"]), sorted(splits["Validation_Set"]))], None
    pooled = {**splits["Train_Set"], **splits["Validation_Set"]}
    folds = assign_folds(pooled, cfg.folds, cfg.seed)
    return [(f"fold{k}", sorted(i for i in pooled if folds[i] != k), sorted(i for i in pooled if folds[i] == k))
            for k in range(cfg.folds)], folds


def summary(values):
    return {"per_fold": [round(v, 5) for v in values], "mean": round(float(np.mean(values)), 5),
            "std": round(float(np.std(values)), 5)}


def train_stage2(cfg):
    modes, candidates = check_stage2_config(cfg)
    device = resolve_device(cfg.device)
    splits = read_annotations(cfg.annotations)
    pooled = {**splits["Train_Set"], **splits["Validation_Set"]}
    paths = stage2_features(cfg, list(pooled))
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun the features are extracted by all ranks, fit on one
        return None
    runs, folds = protocol(cfg, splits)
    rows = load_rows(paths, pooled)
    if not cfg.encoder:
        print("warning: no --encoder given: stage2.json will not say which Stage I run made the features, "
              "and infer.py needs that", file=sys.stderr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage2.json").unlink(missing_ok=True)  # until the new one is complete, DIR holds no checkpoint

    results, saved = {}, []
    for mode in modes:
        results[mode] = []
        for k, (name, train_ids, report_ids) in enumerate(runs):
            started = time.perf_counter()
            model, selection = select_and_train(rows, train_ids, mode, cfg, device, candidates, cfg.seed + 1000 * k)
            chosen = (selection["smoothing"]["kind"], selection["smoothing"]["window"])
            reported = scores(rows, video_logits(model, rows, report_ids, device), [("none", 1), chosen], device)
            results[mode].append({"name": name, "train_ids": len(train_ids), "report_ids": report_ids,
                                  "raw": round(reported[("none", 1)], 5), "smoothed": round(reported[chosen], 5),
                                  "selection": selection})
            tqdm.write(f"{mode} {name}: epoch {selection['epoch']}, smoothing {chosen[0]} {chosen[1]}; Macro-F1 "
                       f"raw {reported[('none', 1)]:.4f}, smoothed {reported[chosen]:.4f} "
                       f"({time.perf_counter() - started:.1f} s)")
            if mode == cfg.mode:
                save_safetensors(out / f"fold{k}.safetensors", model.state_dict())
                saved.append(f"fold{k}.safetensors")

    ablation = {mode: {kind: summary([r[kind] for r in results[mode]]) for kind in ("raw", "smoothed")}
                for mode in modes}
    final = results[cfg.mode]
    # one smoothing for the deployed ensemble: the best mean over the folds' inner selection splits
    candidate_means = {c: np.mean([r["selection"]["inner_smoothing"][f"{c[0]}:{c[1]}"] for r in final])
                       for c in candidates}
    kind, window = max(candidates, key=lambda c: candidate_means[c])
    report = {"protocol": "train -> validation" if cfg.folds == 0 else f"{cfg.folds}-fold cross-validation by video",
              "folds": [r["name"] for r in final], "ablation": ablation, "runs": results,
              "fold_of_id": folds, "config": asdict(cfg)}
    save_json(out / "report.json", report)
    markdown = report_markdown(cfg, results, ablation, (kind, window))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    info = {"format": STAGE2_FORMAT, "encoder": str(Path(cfg.encoder).resolve()) if cfg.encoder else None,
            "audio_model": cfg.audio_model, "audio_revision": cfg.audio_revision,
            "detector": None if cfg.boxes else cfg.detector,
            "features": feature_settings(next(iter(paths.values()))), "mode": cfg.mode,
            "smoothing": {"kind": kind, "window": window}, "folds": cfg.folds, "fold_files": saved,
            "fusion": fusion_kwargs(cfg, rows, cfg.mode),
            "metrics": {"macro_f1": ablation[cfg.mode],
                        "selection": [{"epoch": r["selection"]["epoch"], "smoothing": r["selection"]["smoothing"]}
                                      for r in final]},
            "config": asdict(cfg)}
    save_json(out / "stage2.json", info)
    tqdm.write(markdown)
    return info


def report_markdown(cfg, results, ablation, smoothing):
    names = [r["name"] for r in next(iter(results.values()))]
    lines = [f"# Stage II ablation ({'Train -> Validation' if cfg.folds == 0 else f'{cfg.folds}-fold CV by video'})",
             "", "Macro-F1 on the reported split; the epoch and the smoothing of each fold were chosen on an "
             "inner split of its training videos. Smoothed: each fold's own choice.", "",
             "| mode | " + " | ".join(names) + " | mean +/- std |", "|---|" + "---|" * (len(names) + 1)]
    for mode, runs in results.items():
        for kind in ("raw", "smoothed"):
            cells = [f"{r[kind]:.4f}" for r in runs]
            lines.append(f"| {mode} {kind} | " + " | ".join(cells) +
                         f" | {ablation[mode][kind]['mean']:.4f} +/- {ablation[mode][kind]['std']:.4f} |")
    lines += ["", f"Saved: the {cfg.mode} fold models; smoothing for inference: {smoothing[0]}, window {smoothing[1]}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- command line

def field_comments(config_class):
    """{field: its trailing comment} from the dataclass's source: the comments are the --help texts."""
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.MULTILINE))


def add_config_arguments(parser, config_class):
    """One flag per field of the config dataclass, with the field's default and its comment as the help."""
    comments = field_comments(config_class)
    for name, default in asdict(config_class()).items():
        flag = "--" + name.replace("_", "-")
        comment = comments.get(name, "").replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=f"{comment} (default off)".lstrip())
        elif isinstance(default, list):
            parser.add_argument(flag, action="append", default=[], help=f"{comment} (repeatable)".lstrip())
        else:
            shown = " (default %(default)s)" if default not in ("", None) else ""
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default,
                                help=(comment + shown).lstrip())


def main(argv=None):
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", type=int)
    config_class = Stage2Config if stage.parse_known_args(argv)[0].stage == 2 else Stage1Config
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True,
                        help="1: fine-tune the image encoder; 2: gated fusion on extracted features "
                        "(`--stage 2 --help` lists its flags)")
    if config_class is Stage1Config:
        parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(parser, config_class)
    args = vars(parser.parse_args(argv))
    if args.pop("stage") == 2:
        train_stage2(Stage2Config(**args))
    else:
        resume = args.pop("resume")
        train_stage1(Stage1Config(**args), resume)


if __name__ == "__main__":
    sys.exit(run(main))
