"""emo: frame-level facial expression recognition in real-world videos, with sound.

This file holds the commands that use the whole package, at the top of its import graph
(models <- data <- train, infer <- emo), and the synthetic dataset they run on:

    python emo.py demo        # the whole workflow on a synthetic dataset, offline, in minutes on a CPU
    python emo.py synth OUT   # a small seeded dataset in the ABAW layouts: videos, annotations, crops, images
    python emo.py bench       # speed: backbones and a Stage I step vs transformers (MFU), media, features, Stage II
"""
import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import data
import infer
import train
from data import macro_f1, write_annotation, write_video
from models import (CLASSES, IGNORE_LABEL, EmoError, ViT, ViTConfig, Wav2Vec2, Wav2Vec2Config, atomic_path, init_random,
                    run, save_hf_checkpoint, save_json)

# ------------------------------------------------------------------------------------ the demo
# The whole workflow on a synthetic dataset, offline: synthesize, tiny random backbones written in
# Hugging Face format, train.py --stage 1, train.py --stage 2 (2 folds, from the raw videos with
# their true face boxes: no detector weights are available offline), infer.py on a held-out video.

# The demo's backbones: ViTConfig / Wav2Vec2Config values
TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=98)
TINY_WAV2VEC2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
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
    vit_dir = save_hf_checkpoint(init_random(ViT(ViTConfig(**TINY_DINOV2)), seed), out / "backbones" / "dinov2-tiny")
    w2v_dir = save_hf_checkpoint(init_random(Wav2Vec2(Wav2Vec2Config(**TINY_WAV2VEC2)), seed + 1),
                                 out / "backbones" / "wav2vec2-tiny")
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
    argv = [str(video), "--ckpt", str(out / "stage2"), "--out", str(out / "predictions"), "--boxes", str(boxes),
            "--device", "cpu"]
    say(f"$ {command('infer.py', argv)}")
    infer.main(argv)
    rows = (out / "predictions" / f"{video.stem}.csv").read_text().splitlines()
    header = rows[0].split(",")
    label = header.index("label")
    names = list(CLASSES)
    return torch.tensor([names.index(r.split(",")[label]) for r in rows[1:]])


def run_challenge(out, heldout):
    """The held-out set (never trained on) as the challenge's test set: a template made as the organisers make
    theirs (every frame 1..N of every id, pre-filled), infer.py's submission for it with every id scored against
    its annotation, and the check of the submission."""
    files = sorted((heldout / "annotations" / "EXPR_Recognition_Challenge").glob("*/*.txt"))
    rows = [f"{file.stem}/{frame:05d}.jpg,0" for file in files for frame in range(1, len(data.read_annotation(file)) + 1)]
    annotations = out / "challenge" / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, annotations / file.name)
    template = out / "challenge" / "test_set_template.txt"
    template.write_text(infer.SUBMISSION_HEADER + "\n" + "\n".join(rows) + "\n")
    argv = [str(heldout / "videos"), "--ckpt", str(out / "stage2"), "--out", str(out / "challenge"), "--boxes",
            str(heldout / "boxes"), "--device", "cpu", "--submission", str(template),
            "--annotations", str(annotations)]
    say(f"$ {command('infer.py', argv)}")
    infer.main(argv)
    check = ["--check-submission", str(out / "challenge" / "submission.txt"), "--submission", str(template)]
    say(f"$ {command('infer.py', check)}")
    infer.main(check)
    return json.loads((out / "challenge" / "scores.json").read_text()), len(rows)


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
        say(f"\n== {len(timings)}/6 {text}")

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    dataset, heldout = out / "data", out / "heldout"
    step("data", f"synthetic dataset -> {dataset}, held-out videos -> {heldout}")
    synthesize(SynthConfig(out=str(dataset), seed=cfg.seed, videos=cfg.videos, frames=cfg.frames,
                                     images=cfg.images))
    synthesize(SynthConfig(out=str(heldout), seed=cfg.seed + 1000, videos=4, frames=cfg.frames, images=0))
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

    step("challenge", f"the held-out set as a test set: template, submission, its check -> {out / 'challenge'}")
    scores, rows = run_challenge(out, heldout)
    done("challenge")
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {"config": asdict(cfg), "timings_s": timings,
               "stage1": {"epoch": best["epoch"], "validation_macro_f1": round(best["metrics"]["macro_f1"], 4)},
               "stage2": report["ablation"], "heldout": {"video": str(video), "macro_f1": round(heldout_f1, 4)},
               "challenge": {"rows": rows, "macro_f1": scores["smoothed"]["macro_f1"],
                             "raw_macro_f1": scores["raw"]["macro_f1"]}}
    save_json(out / "demo.json", summary)
    say("\n== results")
    say(f"Stage I: validation Macro-F1 {best['metrics']['macro_f1']:.3f} (epoch {best['epoch']}), "
        f"chance {1 / len(CLASSES):.3f}")
    say(f"Stage II ablation, {cfg.folds}-fold cross-validation by video (the demo's tiny backbones, synthetic data):")
    say(ablation_table(report))
    say(f"infer.py on the held-out video {video.name}: Macro-F1 {heldout_f1:.3f} (fused, smoothed)")
    say(f"the held-out set as the challenge: a {rows}-row submission, checked; Macro-F1 over its frames "
        f"{scores['smoothed']['macro_f1']:.3f} (smoothed), {scores['raw']['macro_f1']:.3f} (raw)")
    say(f"outputs: {out}/")
    for name, what in (("data", "synthetic dataset (videos, annotations, crops, true boxes, images)"),
                       ("backbones", "tiny random backbones in Hugging Face format"),
                       ("stage1/best", "Stage I encoder"), ("stage2", "Stage II checkpoint, report.md"),
                       ("predictions", "infer.py outputs: CSV, ABAW rows, PNG timeline"),
                       ("challenge", "template, submission.txt, scores.md of the held-out set"),
                       ("demo.json", "this summary")):
        say(f"  {name:<14}{what}")
    say(f"time: {timings['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        + ")")
    return summary


def demo(out="emo-demo", overwrite=False, quick=False, seed=0):
    """python emo.py demo: the whole workflow on a synthetic dataset, offline, in minutes on a CPU."""
    cfg = DemoConfig(out=out, overwrite=overwrite, seed=seed, **(QUICK if quick else {}))
    threads = torch.get_num_threads()
    # The models are tiny: a second thread per operation only waits for the first (and for the Stage I
    # data-loading process), and on a busy machine those waits make the run several times slower.
    torch.set_num_threads(1)
    try:
        return run_demo(cfg)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- synthetic faces

# Each class as a face: mouth curve (+ smile / - frown), mouth openness, brow tilt (+ inner ends
# up, - an angry V), brow lift, eye openness, mouth asymmetry. Fear and Surprise are nearly the
# same face on purpose; their sounds differ (SOUNDS below), so audio fusion has something to win.
EXPRESSIONS = {
    "Neutral":   dict(curve=0.0, open=0.0, tilt=0.0, lift=0.0, eyes=0.55, skew=0.0),
    "Anger":     dict(curve=-0.3, open=0.1, tilt=-1.0, lift=-0.4, eyes=0.40, skew=0.0),
    "Disgust":   dict(curve=-0.6, open=0.25, tilt=-0.5, lift=-0.2, eyes=0.25, skew=0.3),
    "Fear":      dict(curve=-0.15, open=0.70, tilt=0.7, lift=0.85, eyes=1.0, skew=0.0),
    "Happiness": dict(curve=1.0, open=0.30, tilt=0.0, lift=0.1, eyes=0.40, skew=0.0),
    "Sadness":   dict(curve=-0.9, open=0.0, tilt=1.0, lift=0.1, eyes=0.30, skew=0.0),
    "Surprise":  dict(curve=-0.10, open=0.75, tilt=0.65, lift=0.9, eyes=1.0, skew=0.0),
    "Other":     dict(curve=0.4, open=0.0, tilt=0.3, lift=0.0, eyes=0.55, skew=1.0),
}
NEUTRAL = EXPRESSIONS["Neutral"]

# Each class as a sound: carrier Hz, amplitude-modulation Hz, frequency-modulation depth Hz.
SOUNDS = {
    "Neutral":   (220.0, 0.0, 0.0),
    "Anger":     (330.0, 9.0, 40.0),
    "Disgust":   (440.0, 3.0, 0.0),
    "Fear":      (1800.0, 14.0, 150.0),  # high and trembling
    "Happiness": (660.0, 5.0, 60.0),
    "Sadness":   (180.0, 1.5, 10.0),
    "Surprise":  (520.0, 0.0, 250.0),   # low and swooping; looks like Fear
    "Other":     (990.0, 7.0, 0.0),
}
LOOKALIKE = ("Fear", "Surprise")


def draw_face(size, expression, skin):
    """An RGBA image (size x size) of a face ellipse showing `expression` (a dict like NEUTRAL)."""
    s = size
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    cx, cy = s / 2, s / 2
    rx, ry = 0.36 * s, 0.46 * s
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin + (255,), outline=(60, 40, 30, 255),
                 width=max(1, s // 40))
    dark = (30, 25, 25, 255)
    width = max(1, s // 28)
    eye_y, eye_dx, eye_w = cy - 0.12 * s, 0.14 * s, 0.075 * s
    eye_h = max(0.012 * s, 0.06 * s * expression["eyes"])
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=(250, 250, 250, 255),
                     outline=dark, width=max(1, width // 2))
        pupil = min(eye_h, 0.03 * s)
        draw.ellipse([ex - pupil, eye_y - pupil, ex + pupil, eye_y + pupil], fill=dark)
        # brow: inner end near the nose, outer end away from it
        brow_y = eye_y - 0.10 * s - 0.07 * s * expression["lift"]
        inner = (cx + side * 0.06 * s, brow_y - 0.05 * s * expression["tilt"])
        outer = (cx + side * 0.24 * s, brow_y + 0.02 * s * expression["tilt"])
        draw.line([inner, outer], fill=dark, width=width + 1)
    draw.line([(cx, cy - 0.04 * s), (cx - 0.03 * s, cy + 0.08 * s), (cx + 0.01 * s, cy + 0.09 * s)],
              fill=(120, 80, 60, 255), width=max(1, width // 2))
    # mouth: a curve through the corners and the middle; openness adds a lower lip
    mouth_y, half = cy + 0.24 * s, 0.15 * s
    corner_up = 0.07 * s * expression["curve"]
    skew = 0.05 * s * expression["skew"]
    left, right = (cx - half, mouth_y - corner_up + skew), (cx + half, mouth_y - corner_up - skew)
    upper = [_bezier(left, (cx, mouth_y + corner_up), right, t) for t in np.linspace(0, 1, 12)]
    opening = 0.16 * s * expression["open"]
    if opening > 0.01 * s:
        lower = [_bezier(right, (cx, mouth_y + corner_up + 2 * opening), left, t) for t in np.linspace(0, 1, 12)]
        draw.polygon(upper + lower, fill=(90, 20, 30, 255), outline=dark)
    else:
        draw.line(upper, fill=dark, width=width + 1)
    return image


def _bezier(a, control, b, t):
    return ((1 - t) ** 2 * a[0] + 2 * (1 - t) * t * control[0] + t ** 2 * b[0],
            (1 - t) ** 2 * a[1] + 2 * (1 - t) * t * control[1] + t ** 2 * b[1])


def expression_for(label, rng, intensity=None):
    """The face parameters of class `label`, at a random intensity, with a little jitter."""
    target = EXPRESSIONS[CLASSES[label]]
    k = rng.uniform(0.7, 1.0) if intensity is None else intensity
    return {key: NEUTRAL[key] + k * (target[key] - NEUTRAL[key]) + rng.normal(0, 0.04) for key in target}


def random_skin(rng):
    base = np.array([225, 185, 150]) * rng.uniform(0.45, 1.05)
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 40, 255))


def background(width, height, rng):
    colour = rng.integers(20, 236, 3)
    noise = rng.normal(0, rng.uniform(2, 14), (height, width, 1))
    pixels = np.clip(colour[None, None, :] + noise + np.linspace(-20, 20, width)[None, :, None], 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def paste_face(canvas, face, centre, side, angle):
    """Scale the face to `side` pixels, rotate by `angle` degrees, paste centred at `centre`.

    Returns the face's box (x0, y0, x1, y1) in integer pixels, clipped to the canvas.
    """
    face = face.resize((side, side), Image.BILINEAR).rotate(angle, resample=Image.BILINEAR)
    x0, y0 = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    canvas.paste(face, (x0, y0), face)
    # the drawn ellipse spans 0.72 x 0.92 of the face square; rotation widens that slightly
    a = math.radians(angle)
    w = 0.72 * side * abs(math.cos(a)) + 0.92 * side * abs(math.sin(a))
    h = 0.72 * side * abs(math.sin(a)) + 0.92 * side * abs(math.cos(a))
    box = [centre[0] - w / 2, centre[1] - h / 2, centre[0] + w / 2, centre[1] + h / 2]
    W, H = canvas.size
    return [int(np.clip(round(box[0]), 0, W)), int(np.clip(round(box[1]), 0, H)),
            int(np.clip(round(box[2]), 0, W)), int(np.clip(round(box[3]), 0, H))]


def class_sound(label, n, sample_rate, rng):
    """n samples of class `label`'s signature tone, with a random starting phase."""
    carrier, am, fm = SOUNDS[CLASSES[label]]
    t = np.arange(n) / sample_rate
    frequency = carrier + fm * np.sin(2 * np.pi * 3.0 * t)
    phase = 2 * np.pi * np.cumsum(frequency) / sample_rate + rng.uniform(0, 2 * np.pi)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * am * t) if am else np.ones(n)
    return envelope * np.sin(phase)


# -------------------------------------------------------------------------- synthetic dataset


@dataclass
class SynthConfig:
    out: str
    seed: int = 0
    videos: int = 7            # raw videos; one of them shows two people, so one more annotation id
    frames: int = 200          # mean frames per video (each is 0.75x .. 1.25x of it)
    width: int = 160
    height: int = 120
    fps: int = 25
    images: int = 24           # Stage I images per class
    crop: int = 112            # side of the aligned face crops, as in Aff-Wild2
    validation: float = 0.3    # share of videos whose annotations go to Validation_Set
    sample_rate: int = 44100   # of the .mp4 audio tracks (the .avi gets 22050 Hz)
    overwrite: bool = False    # replace an earlier synthetic dataset in `out`


@dataclass
class SynthVideo:
    name: str
    file: str
    container: str
    audio: bool
    people: int


def plan_videos(config):
    """Which video is which: mostly H.264/AAC .mp4, one MPEG-4/PCM .avi, one silent, one pair."""
    if config.videos < 4:
        raise EmoError(f"--videos must be at least 4 (an .mp4, an .avi, a silent and a two-person video), "
                       f"got {config.videos}")
    plans = []
    for i in range(config.videos):
        name = f"video{i:02d}"
        kind = {1: "avi", 2: "silent", 3: "pair"}.get(i, "mp4")
        if kind == "avi":
            plans.append(SynthVideo(name, f"videos/batch1/{name}.avi", "avi", True, 1))
        else:
            plans.append(SynthVideo(name, f"videos/batch1/{name}.mp4", "mp4", kind != "silent",
                                    2 if kind == "pair" else 1))
    return plans


def segment_labels(n, rng):
    """Per-frame labels in runs of 20-80 frames, with one short run of -1 (no usable face)."""
    labels = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        run = int(rng.integers(20, 81))
        labels[i:i + run] = rng.integers(0, len(CLASSES))
        i += run
    gap = int(rng.integers(3, 10))
    start = int(rng.integers(0, n - gap))
    labels[start:start + gap] = IGNORE_LABEL
    return labels


def pose_track(n, rng, x_range, y_range, side_range):
    """A smooth random walk of face centre, side and in-plane angle over n frames."""
    def walk(low, high, step):
        values = np.empty(n)
        values[0] = rng.uniform(low, high)
        velocity = 0.0
        for i in range(1, n):
            velocity = 0.9 * velocity + rng.normal(0, step)
            values[i] = values[i - 1] + velocity
            if not low <= values[i] <= high:
                values[i] = np.clip(values[i], low, high)
                velocity = -velocity
        return values
    return (walk(*x_range, 0.4), walk(*y_range, 0.3), walk(*side_range, 0.3), walk(-12, 12, 0.3))


def render_video(plan, n, config, rng):
    """Frames (n, H, W, 3) uint8, labels per annotation id, boxes per annotation id, and crops."""
    W, H = config.width, config.height
    ids = [plan.name] if plan.people == 1 else [data.annotation_id(plan.name, side) for side in ("left", "right")]
    labels = {i: segment_labels(n, rng) for i in ids}
    base = background(W, H, rng)
    blur = rng.uniform(0, 0.8)
    people = []
    for p, annotation_id in enumerate(ids):
        if plan.people == 1:
            x_range, side = (0.35 * W, 0.65 * W), (0.55 * H, 0.75 * H)
        else:  # left person in the left half, right person in the right half
            x_range = (0.2 * W, 0.3 * W) if p == 0 else (0.7 * W, 0.8 * W)
            side = (0.45 * H, 0.55 * H)
        track = pose_track(n, rng, x_range, (0.42 * H, 0.58 * H), side)
        # a frame shows another class's face now and then: noise that temporal smoothing removes
        shown = labels[annotation_id].copy()
        flips = rng.random(n) < 0.08
        shown[flips] = rng.integers(0, len(CLASSES), int(flips.sum()))
        people.append((annotation_id, track, shown, random_skin(rng)))
    frames = np.empty((n, H, W, 3), dtype=np.uint8)
    boxes = {i: [] for i in ids}
    crops = {i: {} for i in ids}
    for f in range(n):
        canvas = base.copy()
        placed = []
        for annotation_id, (xs, ys, sides, angles), shown, skin in people:
            if labels[annotation_id][f] == IGNORE_LABEL:  # face turned away: no face, no box, no crop
                boxes[annotation_id].append(None)
                continue
            label = shown[f]
            face = draw_face(96, expression_for(label, rng), skin)
            box = paste_face(canvas, face, (xs[f], ys[f]), int(round(sides[f])), float(angles[f]))
            boxes[annotation_id].append(box)
            placed.append((annotation_id, box))
        if blur > 0.3:
            canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
        frames[f] = np.asarray(canvas)
        for annotation_id, box in placed:
            if rng.random() < 0.05:  # the face detector missed it: no crop for this frame
                continue
            crops[annotation_id][f] = aligned_crop(canvas, box, config.crop)
    return frames, labels, boxes, crops


def aligned_crop(image, box, side):
    """A square crop 1.2x the box around its centre, zero-padded at the border, resized to side."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = 0.6 * max(box[2] - box[0], box[3] - box[1])
    region = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    return image.crop(region).resize((side, side), Image.BILINEAR)


def render_audio(labels_per_id, n_frames, fps, sample_rate, rng):
    """Mono float32 audio: each person's class tone (from the true labels) plus noise."""
    samples = int(round(n_frames / fps * sample_rate))
    frame_of_sample = np.minimum((np.arange(samples) * fps) // sample_rate, n_frames - 1).astype(np.int64)
    wave = rng.normal(0, 0.03, samples)
    for labels in labels_per_id.values():
        per_sample = labels[frame_of_sample]
        for label in np.unique(per_sample):
            if label == IGNORE_LABEL:
                continue
            where = per_sample == label
            tone = class_sound(int(label), samples, sample_rate, rng)
            wave[where] += 0.3 / len(labels_per_id) * tone[where]
    return (wave * rng.uniform(0.7, 1.0)).astype(np.float32)


def save_jpeg(path, image):
    with atomic_path(path) as tmp:
        image.convert("RGB").save(tmp, format="JPEG", quality=90)


def synthesize(config):
    """Write the synthetic dataset under config.out; returns the manifest (also in manifest.json)."""
    if config.width % 2 or config.height % 2 or min(config.width, config.height) < 64:
        raise EmoError(f"--size must be even and at least 64x64, got {config.width}x{config.height}")
    if config.frames < 40:
        raise EmoError(f"--frames must be at least 40, got {config.frames}")
    if config.fps < 1 or config.images < 0:
        raise EmoError(f"--fps must be at least 1 and --images at least 0, got {config.fps} and {config.images}")
    out = Path(config.out)
    prepare_output(out, config.overwrite)
    rng = np.random.default_rng(config.seed)
    plans = plan_videos(config)
    n_validation = max(1, int(round(config.validation * len(plans))))
    validation = {p.name for p in plans[-n_validation:]}
    splits = {"Train_Set": [], "Validation_Set": []}
    records = []
    for plan in tqdm(plans, desc="synthetic videos", unit="video"):
        n = int(rng.integers(int(0.75 * config.frames), int(1.25 * config.frames) + 1))
        frames, labels, boxes, crops = render_video(plan, n, config, rng)
        split = "Validation_Set" if plan.name in validation else "Train_Set"
        for annotation_id, values in labels.items():
            write_annotation(out / "annotations" / "EXPR_Recognition_Challenge" / split / f"{annotation_id}.txt",
                             values)
            splits[split].append(annotation_id)
            folder = out / "cropped_aligned" / annotation_id
            folder.mkdir(parents=True, exist_ok=True)
            for f, crop in crops[annotation_id].items():
                save_jpeg(folder / f"{f + 1:05d}.jpg", crop)
        rate = config.sample_rate if plan.container == "mp4" else 22050
        audio = render_audio(labels, n, config.fps, rate, rng) if plan.audio else None
        video_path = out / plan.file
        video_path.parent.mkdir(parents=True, exist_ok=True)
        write_video(video_path, frames, config.fps, audio, rate, plan.container)
        (out / "boxes").mkdir(parents=True, exist_ok=True)
        save_json(out / "boxes" / f"{plan.name}.json",
                  {"video": plan.name, "fps": config.fps, "frames": n, "width": config.width,
                   "height": config.height, "format": "x0,y0,x1,y1 pixels; null = no face", "boxes": boxes})
        video_codec, audio_codec = ("h264", "aac") if plan.container == "mp4" else ("mpeg4", "pcm_s16le")
        records.append({"video": plan.name, "file": plan.file, "frames": n, "split": split,
                        "ids": list(labels), "audio": plan.audio, "people": plan.people,
                        "container": plan.container, "video_codec": video_codec,
                        "audio_codec": audio_codec if plan.audio else None})
    image_counts = write_images(out / "images", config, rng)
    manifest = {
        "seed": config.seed, "fps": config.fps, "width": config.width, "height": config.height,
        "classes": list(CLASSES), "videos": records, "splits": splits,
        "no_audio": [r["video"] for r in records if not r["audio"]],
        "two_person": [r["video"] for r in records if r["people"] == 2],
        "lookalike": {"classes": list(LOOKALIKE),
                      "note": "nearly the same face, clearly different sound"},
        "images": image_counts,
        "annotations": "annotations/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<id>.txt",
        "cropped_aligned": "cropped_aligned/<id>/<frame, 1-based, 5 digits>.jpg; some frames missing",
        "boxes": "boxes/<video>.json: per annotation id, one box or null per frame",
    }
    save_json(out / "manifest.json", manifest)
    return manifest


SYNTH_OUTPUTS = ("annotations", "cropped_aligned", "videos", "boxes", "images", "manifest.json")


def prepare_output(out, overwrite):
    """Refuse a non-empty folder, unless overwrite and it holds an earlier synthetic dataset.

    Stale files of an earlier run (more frames, other ids) would otherwise mix into the new one.
    """
    if out.exists() and not out.is_dir():
        raise EmoError(f"{out} exists and is not a folder; choose another output folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise EmoError(f"{out} is not empty; choose a new folder, or pass --overwrite to replace "
                       "a synthetic dataset written there before")
    manifest = out / "manifest.json"
    try:
        previous = json.loads(manifest.read_text())
        made_by_synth = isinstance(previous, dict) and "seed" in previous and "lookalike" in previous
    except (OSError, ValueError):
        made_by_synth = False
    if not made_by_synth:
        raise EmoError(f"{out} has no synthetic-dataset manifest.json, so --overwrite will not delete "
                       "anything there; choose a new folder")
    for name in SYNTH_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_images(folder, config, rng):
    """Stage I image-folder dataset: images/<ClassName>/NNNNN.jpg, face crops with pose jitter."""
    counts = {}
    side = config.crop
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(config.images):
            canvas = background(side, side, rng)
            face = draw_face(96, expression_for(label, rng), random_skin(rng))
            centre = (side / 2 + rng.normal(0, 4), side / 2 + rng.normal(0, 4))
            paste_face(canvas, face, centre, int(side * rng.uniform(0.9, 1.1)), float(rng.normal(0, 6)))
            if rng.random() < 0.3:
                canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
            save_jpeg(folder / name / f"{k:05d}.jpg", canvas)
        counts[name] = config.images
    return counts


# ---------------------------------------------------------------------------------- command line

def _size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        return width, height
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x120, got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="emo.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="measure speed: backbones against transformers, media pipeline, "
                                "Stage I training step, feature extraction, Stage II training, infer.py",
                                description="backbones: the same random weights in emo and transformers, forward "
                                "passes timed in one run; train: a Stage I training step against transformers; "
                                "media: decode + detect + crop, batched and frame by frame; features: "
                                "data.video_features against the model forwards alone; stage2: gated-fusion "
                                "training frames/s and peak memory on a million feature rows; infer: infer.py end "
                                "to end against the model forwards alone; submission: writing and checking a 1,022,656-row ABAW "
                                "submission; memory (not in all): infer.py's peak RSS on a 1-minute, a "
                                "10-minute and a 4K video (needs requirements-dev.txt).")
    bench.add_argument("what", nargs="?", default="all",
                       choices=("backbones", "train", "media", "features", "stage2", "infer", "submission", "memory",
                                "all"))
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per model (best is kept)")
    bench.add_argument("--compile", action="store_true", help="also time emo under torch.compile")
    bench.add_argument("--small", action="store_true", help="tiny configs, to check the script quickly")
    s = commands.add_parser(
        "synth", help="write a small seeded synthetic dataset in the ABAW layouts",
        description="Write a deterministic synthetic dataset: raw videos (H.264/AAC .mp4, an MPEG-4/PCM .avi, "
        "a silent one, a two-person one with _left/_right ids), ABAW annotation files, cropped_aligned face "
        "crops (some frames missing), true face boxes, an image-folder set for Stage I and manifest.json. "
        f"{LOOKALIKE[0]} and {LOOKALIKE[1]} look nearly alike but sound different.")
    defaults = SynthConfig(out="")
    s.add_argument("out", help="output folder: new or empty (created if missing)")
    s.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    s.add_argument("--videos", type=int, default=defaults.videos, help="raw videos, at least 4 (default %(default)s)")
    s.add_argument("--frames", type=int, default=defaults.frames,
                   help="mean frames per video, each 0.75x-1.25x of it (default %(default)s)")
    s.add_argument("--size", type=_size, default=(defaults.width, defaults.height),
                   help="frame size WxH, even numbers (default 160x120)")
    s.add_argument("--fps", type=int, default=defaults.fps, help="frames per second (default %(default)s)")
    s.add_argument("--images", type=int, default=defaults.images,
                   help="Stage I images per class (default %(default)s)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic dataset written to OUT before (only its own files are deleted)")
    demo_command = commands.add_parser("demo",
                                       help="run the whole workflow on a synthetic dataset, offline (minutes on a CPU)",
                               description="Generate a synthetic dataset, write tiny random backbones in Hugging Face "
                               "format, train Stage I and Stage II (2 folds) through the same code as real runs, "
                               "predict a held-out video with infer.py, and print the ablation table.")
    demo_command.add_argument("--out", default="emo-demo", help="output folder, new or empty (default %(default)s)")
    demo_command.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --out")
    demo_command.add_argument("--quick", action="store_true", help="a smaller, faster run (what the tests run)")
    demo_command.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "synth":
        config = SynthConfig(out=args.out, seed=args.seed, videos=args.videos, frames=args.frames,
                             width=args.size[0], height=args.size[1], fps=args.fps, images=args.images,
                             overwrite=args.overwrite)
        manifest = synthesize(config)
        ids = sum(len(v) for v in manifest["splits"].values())
        print(f"wrote {len(manifest['videos'])} videos, {ids} annotation ids and "
              f"{sum(manifest['images'].values())} images to {args.out}")
    elif args.command == "demo":
        demo(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed)
    elif args.command == "bench":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tests import bench as benchmarks  # the reference implementations are test dependencies
        benchmarks.run(args.what, device=args.device, repeats=args.repeats, compile=args.compile, small=args.small)


if __name__ == "__main__":
    sys.exit(run(main))
