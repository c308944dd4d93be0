"""The built-in demo: the whole emo workflow on a synthetic dataset, offline, in minutes on a laptop CPU.

    python emo.py demo                      # writes emo-demo/ and prints the ablation table
    python emo.py demo --out /tmp/d --quick # a smaller run (what the test suite runs)

It generates the synthetic dataset (data.synthesize), writes tiny random DINOv2 and wav2vec 2.0
backbones as Hugging Face checkpoints (models.save_hf_checkpoint), trains Stage I with train.py's
own entry point, extracts the Stage II per-frame features, trains Stage II with 2-fold cross-validation
and runs infer.py on a held-out synthetic video. There are no face-detector weights offline, so the
features and the predictions use the synthetic videos' true face boxes (boxes/<video>.json), the
format in which you can bring your own detector's boxes too (data.read_boxes).
"""
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import train
from emo import EmoError, macro_f1
from models import ViT, ViTConfig, Wav2Vec2, Wav2Vec2Config, init_random, save_hf_checkpoint

TINY_DINOV2 = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=98)
TINY_WAV2VEC2 = Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)

# Stage I on the synthetic faces with a from-scratch tiny ViT: the recipe's settings are for fine-tuning a
# pretrained ViT-L; a random one learns this data in minutes only at a higher learning rate, on every
# layer, with a linear head and only the crop augmentation (0.77 covers the eval transform's centre crop).
STAGE1_FLAGS = ["--image-size", "42", "--head", "linear", "--batch-size", "16", "--freeze-blocks", "0",
                "--layer-decay", "1", "--lr-backbone", "1e-3", "--lr-head", "1e-3", "--crop-scale", "0.77",
                "--jitter", "0", "--grayscale", "0", "--blur", "0", "--padaug", "0", "--erasing", "0",
                "--label-smoothing", "0", "--mixup-alpha", "0"]


@dataclass
class DemoConfig:
    out: str = "emo-demo"
    seed: int = 0
    videos: int = 8                # synthetic videos for Stage II (one holds two people)
    frames: int = 250              # mean frames per video
    images: int = 128              # Stage I images per class
    stage1_epochs: int = 20
    stage2_epochs: int = 20
    folds: int = 2
    overwrite: bool = False        # replace the outputs of an earlier demo in `out`
    workers: int = 1               # Stage I data-loading processes


QUICK = dict(videos=6, frames=150, images=96, stage1_epochs=20, stage2_epochs=15)


def say(text):
    print(text, flush=True)


def command(program, argv):
    return " ".join(shlex.quote(str(a)) for a in [sys.executable, program, *argv])


def write_backbones(out, seed):
    """Tiny random DINOv2 and wav2vec 2.0 as Hugging Face checkpoint directories: our own writer, no transformers."""
    vit_dir = save_hf_checkpoint(init_random(ViT(TINY_DINOV2), seed), out / "backbones" / "dinov2-tiny")
    w2v_dir = save_hf_checkpoint(init_random(Wav2Vec2(TINY_WAV2VEC2), seed + 1), out / "backbones" / "wav2vec2-tiny")
    return vit_dir, w2v_dir


def run_stage1(cfg, out, dataset, backbone):
    validation = dataset / "annotations" / "EXPR_Recognition_Challenge" / "Validation_Set"
    argv = ["--stage", "1", "--data", f"plain:{dataset / 'images'}", "--val", f"{dataset / 'cropped_aligned'},{validation}",
            "--backbone", str(backbone), "--out", str(out / "stage1"), "--epochs", str(cfg.stage1_epochs),
            "--workers", str(cfg.workers), "--seed", str(cfg.seed), *STAGE1_FLAGS]
    say(f"$ {command('train.py', argv)}")
    train.main(argv)
    best = json.loads((out / "stage1" / "best" / "model.json").read_text())
    return best


def stage1_image_size():
    return int(STAGE1_FLAGS[STAGE1_FLAGS.index("--image-size") + 1])


def feature_config():
    size = stage1_image_size()
    return data.FeatureConfig(crop_size=size, crop_resize=round(size * 256 / 224))


def extract(out, dataset, w2v_dir):
    manifest = json.loads((dataset / "manifest.json").read_text())
    ids = [i for split in manifest["splits"].values() for i in split]
    return data.extract_features(ids, data.find_videos(dataset / "videos"), out / "features", out / "stage1",
                                 str(w2v_dir), None, feature_config(), boxes=dataset / "boxes",
                                 device="cpu", progress=True)


def prepare(out, overwrite):
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise EmoError(f"{out} is not empty; choose another --out, or pass --overwrite to replace an earlier demo")
        if not (out / "demo.json").is_file():
            raise EmoError(f"{out} holds no earlier demo (no demo.json), so --overwrite will not delete anything "
                           "there; choose another --out")
        import shutil
        for name in ("data", "heldout", "backbones", "stage1", "features", "stage2", "predictions", "demo.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg):
    out = Path(cfg.out)
    prepare(out, cfg.overwrite)
    started = time.perf_counter()
    timings = {}

    def lap(name, since):
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    say(f"1/6 synthetic dataset -> {out / 'data'}")
    dataset, heldout = out / "data", out / "heldout"
    data.synthesize(data.SynthConfig(out=str(dataset), seed=cfg.seed, videos=cfg.videos, frames=cfg.frames,
                                     images=cfg.images))
    data.synthesize(data.SynthConfig(out=str(heldout), seed=cfg.seed + 1000, videos=4, frames=cfg.frames, images=0))
    t = lap("data", t)

    say(f"2/6 tiny random backbones (Hugging Face format) -> {out / 'backbones'}")
    vit_dir, w2v_dir = write_backbones(out, cfg.seed)
    t = lap("backbones", t)

    say(f"3/6 Stage I -> {out / 'stage1'}")
    best = run_stage1(cfg, out, dataset, vit_dir)
    t = lap("stage1", t)

    say(f"4/6 Stage II features (the videos' true face boxes) -> {out / 'features'}")
    extract(out, dataset, w2v_dir)
    t = lap("features", t)

    summary = {"config": asdict(cfg), "stage1": {"epoch": best["epoch"], "macro_f1": best["metrics"]["macro_f1"]},
               "timings_s": timings}
    timings["total"] = round(time.perf_counter() - started, 1)
    return summary
