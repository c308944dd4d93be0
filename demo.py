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
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import train
from emo import CLASSES, EmoError, macro_f1, save_json
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
    videos: int = 12               # synthetic videos for Stage II (one holds two people)
    frames: int = 250              # mean frames per video
    images: int = 128              # Stage I images per class
    stage1_epochs: int = 20
    stage2_epochs: int = 20
    folds: int = 2
    overwrite: bool = False        # replace the outputs of an earlier demo in `out`
    workers: int = 1               # Stage I data-loading processes


QUICK = dict(videos=8, frames=200, images=64, stage1_epochs=10, stage2_epochs=20)  # --quick, and the test suite


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
    argv = ["--stage", "1", "--data", f"plain:{dataset / 'images'}",
            "--val", f"{dataset / 'cropped_aligned'},{validation}", "--val-frames-per-video", "1000",
            "--backbone", str(backbone), "--out", str(out / "stage1"), "--epochs", str(cfg.stage1_epochs),
            "--workers", str(cfg.workers), "--seed", str(cfg.seed), *STAGE1_FLAGS]
    say(f"$ {command('train.py', argv)}")
    train.main(argv)
    best = json.loads((out / "stage1" / "best" / "model.json").read_text())
    return best


# Stage II at the tiny scale: a few thousand frames, so smaller batches, a narrower head and a higher learning rate
STAGE2_FLAGS = ["--folds", "2", "--inner-folds", "2", "--hidden", "64", "--batch-size", "256", "--lr", "3e-3",
                "--min-lr", "1e-4", "--smoothing-windows", "5,11,25,51"]


def run_stage2(cfg, out, dataset, w2v_dir):
    """train.py --stage 2 from the raw videos, with the videos' true face boxes instead of a detector."""
    argv = ["--stage", "2", "--annotations", str(dataset / "annotations"), "--videos", str(dataset / "videos"),
            "--boxes", str(dataset / "boxes"), "--encoder", str(out / "stage1" / "best"),
            "--audio-model", str(w2v_dir), "--out", str(out / "stage2"), "--epochs", str(cfg.stage2_epochs),
            "--seed", str(cfg.seed), *STAGE2_FLAGS]
    say(f"$ {command('train.py', argv)}")
    return train.main(argv)


def heldout_video(heldout):
    """The held-out dataset's first single-person video with sound: (video, boxes file, labels)."""
    manifest = json.loads((heldout / "manifest.json").read_text())
    record = next(r for r in manifest["videos"] if r["audio"] and r["people"] == 1 and r["container"] == "mp4")
    split = record["split"]
    labels = data.read_annotation(heldout / "annotations" / "EXPR_Recognition_Challenge" / split
                                  / f"{record['video']}.txt")
    return heldout / record["file"], heldout / "boxes" / f"{record['video']}.json", labels


def run_infer(out, video, boxes):
    import infer
    argv = [str(video), "--ckpt", str(out / "stage2"), "--out", str(out / "predictions"), "--boxes", str(boxes),
            "--device", "cpu"]
    say(f"$ {command('infer.py', argv)}")
    infer.main(argv)
    rows = (out / "predictions" / f"{video.stem}.csv").read_text().splitlines()
    header = rows[0].split(",")
    label = header.index("label")
    names = list(CLASSES)
    return torch.tensor([names.index(r.split(",")[label]) for r in rows[1:]])


MODES = ("visual", "audio", "fused")


def ablation_table(report):
    """The ablation as a text table: mode x (raw, smoothed), mean +/- std over the folds."""
    lines = [f"{'Macro-F1':<10}{'raw':>18}{'smoothed':>18}"]
    ablation = report["ablation"]
    for mode in sorted(ablation, key=lambda m: MODES.index(m) if m in MODES else len(MODES)):
        scores = ablation[mode]
        cells = [f"{scores[k]['mean']:.3f} +/- {scores[k]['std']:.3f}" for k in ("raw", "smoothed")]
        lines.append(f"{mode:<10}{cells[0]:>18}{cells[1]:>18}")
    return "\n".join(lines)


def prepare(out, overwrite):
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise EmoError(f"{out} is not empty; choose another --out, or pass --overwrite to replace an earlier demo")
        if not (out / "demo.json").is_file():
            raise EmoError(f"{out} holds no earlier demo (no demo.json), so --overwrite will not delete anything "
                           "there; choose another --out")
        for name in ("data", "heldout", "backbones", "stage1", "stage2", "predictions", "demo.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg):
    """Run every step; returns the summary also written to <out>/demo.json."""
    out = Path(cfg.out)
    prepare(out, cfg.overwrite)
    started = time.perf_counter()
    timings = {}

    def step(name, text):
        timings[name] = time.perf_counter()
        say(f"\n== {len(timings)}/5 {text}")

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    dataset, heldout = out / "data", out / "heldout"
    step("data", f"synthetic dataset -> {dataset}, held-out videos -> {heldout}")
    data.synthesize(data.SynthConfig(out=str(dataset), seed=cfg.seed, videos=cfg.videos, frames=cfg.frames,
                                     images=cfg.images))
    data.synthesize(data.SynthConfig(out=str(heldout), seed=cfg.seed + 1000, videos=4, frames=cfg.frames, images=0))
    done("data")

    step("backbones", f"tiny random DINOv2 and wav2vec 2.0, Hugging Face format -> {out / 'backbones'}")
    vit_dir, w2v_dir = write_backbones(out, cfg.seed)
    done("backbones")

    step("stage1", f"Stage I: the image encoder -> {out / 'stage1'}")
    best = run_stage1(cfg, out, dataset, vit_dir)
    done("stage1")

    step("stage2", f"Stage II: features (true face boxes), gated fusion, {cfg.folds}-fold CV -> {out / 'stage2'}")
    run_stage2(cfg, out, dataset, w2v_dir)
    report = json.loads((out / "stage2" / "report.json").read_text())
    done("stage2")

    step("infer", f"infer.py on a held-out video -> {out / 'predictions'}")
    video, boxes, labels = heldout_video(heldout)
    predicted = run_infer(out, video, boxes)
    heldout_f1 = macro_f1(labels.numpy(), predicted.numpy())
    done("infer")
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {"config": asdict(cfg), "timings_s": timings,
               "stage1": {"epoch": best["epoch"], "validation_macro_f1": round(best["metrics"]["macro_f1"], 4)},
               "stage2": report["ablation"], "heldout": {"video": str(video), "macro_f1": round(heldout_f1, 4)}}
    save_json(out / "demo.json", summary)
    say("\n== results")
    say(f"Stage I: validation Macro-F1 {best['metrics']['macro_f1']:.3f} (epoch {best['epoch']}), "
        f"chance {1 / len(CLASSES):.3f}")
    say(f"Stage II ablation, {cfg.folds}-fold cross-validation by video (the demo's tiny backbones, synthetic data):")
    say(ablation_table(report))
    say(f"infer.py on the held-out video {video.name}: Macro-F1 {heldout_f1:.3f} (fused, smoothed)")
    say(f"outputs: {out}/")
    for name, what in (("data", "synthetic dataset (videos, annotations, crops, true boxes, images)"),
                       ("backbones", "tiny random backbones in Hugging Face format"),
                       ("stage1/best", "Stage I encoder"), ("stage2", "Stage II checkpoint, report.md"),
                       ("predictions", "infer.py outputs: CSV, ABAW rows, PNG timeline"),
                       ("demo.json", "this summary")):
        say(f"  {name:<14}{what}")
    say(f"time: {timings['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        + ")")
    return summary


def main(out="emo-demo", overwrite=False, quick=False, seed=0):
    cfg = DemoConfig(out=out, overwrite=overwrite, seed=seed, **(QUICK if quick else {}))
    threads = torch.get_num_threads()
    # The models are tiny: a second thread per operation only waits for the first (and for the Stage I
    # data-loading process), and on a busy machine those waits make the run several times slower.
    torch.set_num_threads(1)
    try:
        return run_demo(cfg)
    finally:
        torch.set_num_threads(threads)
