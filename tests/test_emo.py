"""The metric (data.py) against scikit-learn, checkpoint files (models.py), emo.py's command line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics

import data
import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(20))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    # Some splits lack classes entirely, on the label side, the prediction side, or both.
    present = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    y_true = rng.choice(present, n)
    y_pred = rng.choice(rng.choice(8, size=int(rng.integers(1, 9)), replace=False), n)
    y_true[rng.random(n) < 0.2] = -1
    keep = y_true != -1

    counts = data.confusion_matrix(y_true, y_pred)
    assert (counts == metrics.confusion_matrix(y_true[keep], y_pred[keep], labels=range(8))).all()
    expected_f1 = metrics.f1_score(y_true[keep], y_pred[keep], labels=range(8), average=None, zero_division=0)
    assert np.allclose(data.f1_per_class(counts), expected_f1, atol=1e-12)
    if keep.any():
        expected_macro = metrics.f1_score(y_true[keep], y_pred[keep], average="macro")
        got = data.macro_f1(torch.from_numpy(y_true), torch.from_numpy(y_pred))  # tensors are accepted too
        assert got == pytest.approx(expected_macro, abs=1e-12)
    else:
        assert data.macro_f1(y_true, y_pred) == 0.0


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="0..7"):
        data.confusion_matrix([0, 8], [0, 1])
    with pytest.raises(ValueError, match="predictions"):
        data.confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="0..7"):
        data.confusion_matrix([0, 1], [0, -1])


def test_checkpoint_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "half": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
             "steps": torch.arange(7), "view": torch.randn(4, 6)[:, ::2]}
    config = {"name": "tiny", "scales": [0.9, 1.2, 1.5], "nested": {"k": 4}}
    models.save_checkpoint(tmp_path / "ckpt", state, config)
    loaded, loaded_config = models.load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    assert loaded.keys() == state.keys()
    for k in state:
        assert loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], state[k])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    models.save_json(path, {"version": 1})
    with pytest.raises(KeyboardInterrupt):
        with models.atomic_path(path) as tmp:
            tmp.write_text('{"version": 2, "half')
            raise KeyboardInterrupt
    assert models.read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_readme_test_command_is_what_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text().split("## ")[0]


def test_command_line_help_and_bench_smoke():
    run = subprocess.run([sys.executable, str(ROOT / "emo.py"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "bench" in run.stdout
    run = subprocess.run([sys.executable, str(ROOT / "emo.py"), "bench", "--small", "--repeats", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ViT" in run.stdout and "Wav2Vec2" in run.stdout and "x transformers" in run.stdout
