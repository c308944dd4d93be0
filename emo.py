"""emo: frame-level facial expression recognition in real-world videos, with sound.

This file is the shared vocabulary of the package: the 8 ABAW classes, the metric, checkpoint
files, where model weights come from, and the command line.

    python emo.py demo       # the whole workflow on a synthetic dataset, offline, in minutes on a CPU
    python emo.py bench      # speed: backbones and a Stage I step vs transformers (MFU), media, features, Stage II
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CLASSES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
NUM_CLASSES = len(CLASSES)
IGNORE_LABEL = -1  # ABAW marks frames to leave out of training and scoring with -1


class EmoError(Exception):
    """A problem with what the user gave us. Command lines print it as one line and exit with 2."""


# ----------------------------------------------------------------------------------- metrics

def confusion_matrix(y_true, y_pred, num_classes=NUM_CLASSES):
    """Counts[true, predicted] over the frames whose true label is not -1."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions")
    keep = y_true != IGNORE_LABEL
    y_true, y_pred = y_true[keep], y_pred[keep]
    for name, values in (("label", y_true), ("prediction", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name}s must lie in 0..{num_classes - 1} (or be -1 for labels)")
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def f1_per_class(counts):
    """F1 of each class from a confusion matrix; 0 for a class that is neither true nor predicted."""
    counts = np.asarray(counts)
    true_positives = np.diag(counts).astype(np.float64)
    true_or_predicted = counts.sum(0) + counts.sum(1)
    return np.divide(2 * true_positives, true_or_predicted,
                     out=np.zeros_like(true_positives), where=true_or_predicted > 0)


def macro_f1(y_true, y_pred, num_classes=NUM_CLASSES):
    """Unweighted mean F1 over the classes that occur in the labels or the predictions.

    This is scikit-learn's f1_score(average="macro") after dropping the -1 frames. On the ABAW
    validation set every class occurs, so it is the challenge metric; on a small split a class
    that is absent on both sides is left out instead of counting as F1 = 0.
    """
    counts = confusion_matrix(y_true, y_pred, num_classes)
    occurs = (counts.sum(0) + counts.sum(1)) > 0
    return float(f1_per_class(counts)[occurs].mean()) if occurs.any() else 0.0


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


def save_checkpoint(directory, state_dict, config, name="model"):
    """Write `<name>.safetensors` (the weights) and `<name>.json` (the config) into `directory`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
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


def _no_weights(where, filenames, name_or_path):
    hub = not Path(name_or_path).expanduser().is_dir()
    return EmoError(f"{where} has no weights: looked for {', '.join(filenames)}"
                    + (" in the hub and, offline, in the Hugging Face cache" if hub else ""))


def load_pretrained(name_or_path, revision=None):
    """(config dict, tensors) of a Hugging Face model: a local directory or a hub repo id.

    Hub files go through huggingface-hub, so its cache, HF_HOME and HF_HUB_OFFLINE=1 behave as
    users expect. Weights come from safetensors; a repo that only has `pytorch_model.bin` is read
    with torch.load(weights_only=True), which cannot run code.
    """
    fetch, where = model_source(name_or_path, revision)
    config_file = fetch("config.json")
    if config_file is None:
        raise EmoError(f"{where} has no config.json")
    config = read_json(config_file)
    for filename in WEIGHT_FILES:
        weights_file = fetch(filename)
        if weights_file is None:
            continue
        if filename.endswith(".index.json"):
            shards = sorted(set(read_json(weights_file).get("weight_map", {}).values()))
            tensors = {}
            for shard in shards:
                shard_file = fetch(shard)
                if shard_file is None:
                    raise EmoError(f"{where} lists weight shard {shard} but it is missing")
                tensors.update(read_safetensors(shard_file))
            return config, tensors
        if filename.endswith(".bin"):
            return config, read_torch_weights(weights_file)
        return config, read_safetensors(weights_file)
    raise _no_weights(where, WEIGHT_FILES, name_or_path)


def fetch_weights_file(name_or_path, filenames, revision=None):
    """Path of a weights file: `name_or_path` itself if it is a file, else the first of `filenames`
    found in that local directory or hub repo (the later ones are not downloaded)."""
    if Path(name_or_path).expanduser().is_file():
        return Path(name_or_path).expanduser()
    fetch, where = model_source(name_or_path, revision)
    found = next((path for path in map(fetch, filenames) if path is not None), None)
    if found is None:
        raise _no_weights(where, filenames, name_or_path)
    return found


def read_torch_weights(path):
    """A .bin / .pth state dict through torch.load(weights_only=True), which cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmoError(f"{path} is not a readable weights file ({e})") from None


def _hub_fetcher(repo_id, revision):
    """fetch(filename) -> local path in the hub cache, or None where the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    def fetch(filename):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise EmoError(f"cannot load {repo_id}: {str(e).splitlines()[0]}") from None
        except LocalEntryNotFoundError:  # offline, and the cache lacks it: a subclass of the next one
            if filename == "config.json":
                raise EmoError(
                    f"cannot load {repo_id}" + (f" at revision {revision}" if revision else "")
                    + ": it is not in the Hugging Face cache and the hub cannot be reached "
                    "(offline, or HF_HUB_OFFLINE=1); download it once online, or pass a local directory"
                ) from None
            return None
        except EntryNotFoundError:
            return None
    return fetch


def resolve_device(device=None):
    """A torch.device from a --device value: None or "auto" is cuda when there is one, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise EmoError(f"unknown device {device!r} ({reason}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmoError(f"--device {device} but no CUDA device is available; use --device cpu")
    return device


# ------------------------------------------------------------------------------------ the demo
# The whole workflow on a synthetic dataset, offline: synthesize, tiny random backbones written in
# Hugging Face format, train.py --stage 1, train.py --stage 2 (2 folds, from the raw videos with
# their true face boxes: no detector weights are available offline), infer.py on a held-out video.

# The demo's backbones: ViTConfig / Wav2Vec2Config values (models.py imports this file, so no models here)
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
    from models import ViT, ViTConfig, Wav2Vec2, Wav2Vec2Config, init_random, save_hf_checkpoint
    vit_dir = save_hf_checkpoint(init_random(ViT(ViTConfig(**TINY_DINOV2)), seed), out / "backbones" / "dinov2-tiny")
    w2v_dir = save_hf_checkpoint(init_random(Wav2Vec2(Wav2Vec2Config(**TINY_WAV2VEC2)), seed + 1),
                                 out / "backbones" / "wav2vec2-tiny")
    return vit_dir, w2v_dir


def run_stage1(cfg, out, dataset, backbone):
    import train
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
    import train
    return train.main(argv)


def heldout_video(heldout):
    """The held-out dataset's first single-person video with sound: (video, boxes file, labels)."""
    import data
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
    import data
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


# ---------------------------------------------------------------------------------- command line

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
                                "to end against the model forwards alone; memory (not in all): infer.py's peak RSS on a 1-minute, a "
                                "10-minute and a 4K video (needs requirements-dev.txt).")
    bench.add_argument("what", nargs="?", default="all",
                       choices=("backbones", "train", "media", "features", "stage2", "infer", "memory", "all"))
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per model (best is kept)")
    bench.add_argument("--compile", action="store_true", help="also time emo under torch.compile")
    bench.add_argument("--small", action="store_true", help="tiny configs, to check the script quickly")
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
    if args.command == "demo":
        demo(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed)
    elif args.command == "bench":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tests import bench as benchmarks  # the reference implementations are test dependencies
        benchmarks.run(args.what, device=args.device, repeats=args.repeats, compile=args.compile, small=args.small)


def run(main, argv=None):
    """Run a command line's main: an EmoError becomes one `error: ...` line and exit status 2."""
    try:
        main(argv)
    except EmoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import emo  # the module data.py, models.py and train.py import: one EmoError class for all of them
    sys.exit(emo.run(emo.main))
