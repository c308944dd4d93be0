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
import sys
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
                                "to end against the model forwards alone (needs requirements-dev.txt).")
    bench.add_argument("what", nargs="?", default="all",
                       choices=("backbones", "train", "media", "features", "stage2", "infer", "all"))
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per model (best is kept)")
    bench.add_argument("--compile", action="store_true", help="also time emo under torch.compile")
    bench.add_argument("--small", action="store_true", help="tiny configs, to check the script quickly")
    demo = commands.add_parser("demo", help="run the whole workflow on a synthetic dataset, offline (minutes on a CPU)",
                               description="Generate a synthetic dataset, write tiny random backbones in Hugging Face "
                               "format, train Stage I and Stage II (2 folds) through the same code as real runs, "
                               "predict a held-out video with infer.py, and print the ablation table.")
    demo.add_argument("--out", default="emo-demo", help="output folder, new or empty (default %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --out")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (what the tests run)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import demo as built_in
        built_in.main(out=args.out, overwrite=args.overwrite, quick=args.quick, seed=args.seed)
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
    sys.exit(run(main))
