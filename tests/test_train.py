"""train.py, Stage I, on the synthetic dataset with a tiny random DINOv2."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import emo
import hf_checkpoints as hf
import train
from models import EmoError, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    emo.synthesize(emo.SynthConfig(out=str(out / "synth"), videos=4, frames=60, width=96, height=72, images=24))
    backbone = hf.save(hf.dinov2(num_hidden_layers=2), out / "backbone")
    return out, backbone


def args(setup, out, *extra):
    root, backbone = setup
    synth = root / "synth"
    return ["--stage", "1", "--data", f"plain:{synth / 'images'}",
            "--val", f"{synth / 'cropped_aligned'},{synth / 'annotations/EXPR_Recognition_Challenge/Validation_Set'}",
            "--backbone", str(backbone), "--out", str(out), "--image-size", "56", "--batch-size", "16",
            "--workers", "0", "--freeze-blocks", "0", "--lr-backbone", "1e-3", "--lr-head", "3e-3",
            "--log-every", "2", *extra]


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_the_loss_is_the_recipe_s_weighted_smoothed_soft_cross_entropy(alpha):
    # F.cross_entropy with probability targets, class weights and label smoothing, on mixed one-hot targets,
    # against the formula written out: smooth each label, mix, then -sum(target * weight * log_softmax).
    cfg = train.Stage1Config(label_smoothing=0.1, mixup_alpha=alpha)
    generator = torch.Generator().manual_seed(0)
    logits, images = torch.randn(16, 8, generator=generator), torch.randn(16, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 8, (16,), generator=generator)
    weights = torch.rand(8, generator=generator) + 0.5
    mixed, soft = train.mix(images, labels, cfg, step=3)
    loss = torch.nn.functional.cross_entropy(logits, soft, weights, label_smoothing=cfg.label_smoothing)
    smoothed = torch.nn.functional.one_hot(labels, 8).float() * 0.9 + 0.1 / 8
    if alpha == 0:
        assert torch.equal(mixed, images)
        expected_targets = smoothed
    else:  # the step's own seed gives lambda and the pairing
        rng = np.random.default_rng([cfg.seed, 3])
        lam = float(rng.beta(alpha, alpha))
        order = torch.from_numpy(rng.permutation(16))
        assert torch.allclose(mixed, lam * images + (1 - lam) * images[order])
        expected_targets = lam * smoothed + (1 - lam) * smoothed[order]
    expected = -(expected_targets * weights * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert abs(float(loss) - float(expected)) <= 1e-6


def test_killed_run_resumes_to_the_same_weights(setup, tmp_path):
    common = ["--epochs", "2", "--save-every", "3"]
    assert train.main(args(setup, tmp_path / "whole", *common)) is None
    killed = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(setup, tmp_path / "killed", *common)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    state = tmp_path / "killed" / "last" / "model.json"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert train.main(args(setup, tmp_path / "killed", *common, "--resume")) is None
    whole = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "last" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    best = json.loads((tmp_path / "whole" / "best" / "model.json").read_text())
    assert best["data"]["train"][0]["images"] == 192 and best["metrics"]["macro_f1"] >= 0
    with pytest.raises(EmoError, match="data differ"):  # the same folder twice is other training data
        train.main(args(setup, tmp_path / "whole", *common, "--resume", "--data", f"plain:{setup[0] / 'synth/images'}"))


def test_bad_runs_fail_with_one_clear_line(setup, tmp_path, capsys):
    def error(*argv):
        assert run(train.main, list(argv)) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: ") and "\n" not in message
        return message

    assert "no training data" in error(*[a for a in args(setup, tmp_path / "a") if not a.startswith("plain:")
                                         and a != "--data"])
    (tmp_path / "empty" / "Anger").mkdir(parents=True)
    assert "no images found" in error(*args(setup, tmp_path / "b"), "--data", f"plain:{tmp_path / 'empty'}")
    assert "does not exist" in error(*args(setup, tmp_path / "c", "--resume"))
    assert "does not exist" in error(*args(setup, tmp_path / "d", "--backbone", str(tmp_path / "nowhere" / "x")))


def test_two_process_torchrun_on_cpu(setup, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *args(setup, tmp_path / "ddp", "--epochs", "1")]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    position = json.loads((tmp_path / "ddp" / "last" / "model.json").read_text())
    assert position["epoch"] == 1 and position["step"] == 192 // 16
    assert (tmp_path / "ddp" / "best" / "model.safetensors").exists()
    # each process validated every other image; together they saw the whole validation set once
    best = json.loads((tmp_path / "ddp" / "best" / "model.json").read_text())
    root = setup[0] / "synth"
    expected = len(data.AffWild2Frames(root / "cropped_aligned", root / "annotations/EXPR_Recognition_Challenge/"
                                       "Validation_Set", frames_per_video=50))
    assert best["metrics"]["images"] == expected


def test_tiny_run_learns_the_synthetic_faces(tmp_path):
    """A from-scratch tiny DINOv2 learns the synthetic expressions, judged on images of another seed.

    The setting is the demo's (emo.STAGE1_FLAGS): the recipe's is for fine-tuning a pretrained ViT-L."""
    import emo
    small = dict(videos=4, frames=40, width=64, height=64)
    emo.synthesize(emo.SynthConfig(out=str(tmp_path / "train"), seed=0, images=128, **small))
    emo.synthesize(emo.SynthConfig(out=str(tmp_path / "val"), seed=1, images=32, **small))
    backbone = hf.save(hf.dinov2(num_hidden_layers=2), tmp_path / "backbone")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the data loader works in a second process
    try:
        started = time.perf_counter()
        train.main(["--stage", "1", "--data", f"plain:{tmp_path / 'train/images'}",
                    "--val", f"plain:{tmp_path / 'val/images'}", "--backbone", str(backbone),
                    "--out", str(tmp_path / "run"), "--epochs", "20", "--workers", "1", *emo.STAGE1_FLAGS])
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    best = json.loads((tmp_path / "run" / "best" / "model.json").read_text())
    chance = 1 / len(data.CLASSES)
    assert best["metrics"]["macro_f1"] >= 0.3 > 2 * chance, (best["metrics"], seconds)
