"""`python emo.py demo --quick`: the whole workflow offline, without transformers, in the test suite."""
import json
import os
import subprocess
import sys
from pathlib import Path

import data
import emo
from models import ViT, ViTConfig, Wav2Vec2, Wav2Vec2Config

ROOT = Path(__file__).resolve().parents[1]
# transformers made unimportable: the demo needs only emo's run-time dependencies
RUN_DEMO = "import sys; sys.modules['transformers'] = None; import emo, models; sys.exit(models.run(emo.main, sys.argv[1:]))"


def test_quick_demo_runs_and_fusion_beats_the_face_alone(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only waits on a busy machine
    finished = subprocess.run([sys.executable, "-c", RUN_DEMO, "demo", "--out", str(out), "--quick"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "fused" in finished.stdout and "Macro-F1" in finished.stdout

    summary = json.loads((out / "demo.json").read_text())
    ablation = summary["stage2"]
    fused, visual = ablation["fused"]["smoothed"]["mean"], ablation["visual"]
    assert fused > max(visual["raw"]["mean"], visual["smoothed"]["mean"]) + 0.05, ablation
    info = json.loads((out / "stage2" / "stage2.json").read_text())
    assert info["folds"] == 2 and len(info["fold_files"]) == 2 and info["detector"] is None

    video = Path(summary["heldout"]["video"])
    rows = (out / "predictions" / f"{video.stem}.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(len(t) for _, t in data.iter_frames(video))
    assert (out / "predictions" / f"{video.stem}.png").is_file()
    assert 0 <= summary["heldout"]["macro_f1"] <= 1

    # the held-out set as the challenge: a template, its submission (checked in the demo), every id scored
    template = (out / "challenge" / "test_set_template.txt").read_text().splitlines()
    submission = (out / "challenge" / "submission.txt").read_text().splitlines()
    assert len(submission) == len(template) == summary["challenge"]["rows"] + 1
    assert [line.rsplit(",", 1)[0] for line in submission] == [line.rsplit(",", 1)[0] for line in template]
    scores = json.loads((out / "challenge" / "scores.json").read_text())
    assert len(scores["ids"]) == 5 and scores["smoothed"]["macro_f1"] == summary["challenge"]["macro_f1"]

    # the backbones are Hugging Face checkpoints that emo's loaders read back
    assert ViT.from_pretrained(out / "backbones" / "dinov2-tiny").cfg == ViTConfig(**emo.TINY_DINOV2)
    assert Wav2Vec2.from_pretrained(out / "backbones" / "wav2vec2-tiny").cfg == Wav2Vec2Config(**emo.TINY_WAV2VEC2)

    again = subprocess.run([sys.executable, "-c", RUN_DEMO, "demo", "--out", str(out), "--quick"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr
