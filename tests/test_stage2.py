"""Stage II: gated fusion, smoothing, leak-free folds and `train.py --stage 2` on synthetic features."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter1d, median_filter, uniform_filter1d

import data
import emo
import train
from models import run
from models import GatedFusion, load_stage2, smooth_logits

LOOK_ALIKE = (3, 6)  # Fear and Surprise: one face, two sounds
SYNTH_CLASSES = (0, 3, 4, 6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread would only wait for the first, and on a busy machine
    those waits make the runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_features(root, videos=15, seed=0, pair_every=4, noise=2.0, dim=16):
    """Feature files and annotations: labels in segments of 20-80 frames over 4 classes, one visual
    prototype for Fear and Surprise (only the audio tells them apart), Gaussian noise per frame;
    every pair_every-th video shows two people (`_left` / `_right`) who share its audio."""
    rng = np.random.default_rng(seed)
    visual_proto = rng.normal(size=(8, dim))
    visual_proto[LOOK_ALIKE[1]] = visual_proto[LOOK_ALIKE[0]]
    audio_proto = np.repeat(rng.normal(size=(1, dim)), 8, axis=0)
    audio_proto[list(LOOK_ALIKE)] = rng.normal(size=(2, dim)) * 1.5
    annotations = root / "annotations" / "EXPR_Recognition_Challenge"
    features = root / "features"
    features.mkdir(parents=True, exist_ok=True)
    for v in range(videos):
        n = int(rng.integers(150, 260))
        split = "Train_Set" if v < int(0.7 * videos) else "Validation_Set"
        names = [f"vid{v:02d}_left", f"vid{v:02d}_right"] if v % pair_every == 1 else [f"vid{v:02d}"]
        audio = None
        for name in names:
            labels = np.empty(n, dtype=np.int64)
            i = 0
            while i < n:
                run_length = int(rng.integers(20, 81))
                labels[i:i + run_length] = rng.choice(SYNTH_CLASSES)
                i += run_length
            visual = visual_proto[labels] + noise * rng.normal(size=(n, dim))
            if audio is None:  # the first person's classes are the ones heard
                audio = audio_proto[labels] + noise * rng.normal(size=(n, dim))
            gap = int(rng.integers(0, n - 10))
            labels[gap:gap + 8] = -1
            data.write_annotation(annotations / split / f"{name}.txt", labels)
            rows = data.FrameFeatures(visual=torch.tensor(visual), audio=torch.tensor(audio),
                                      face=torch.ones(n, dtype=torch.bool),
                                      audio_present=torch.ones(n, dtype=torch.bool),
                                      times=(torch.arange(n, dtype=torch.float64) + 0.5) / 25,
                                      boxes=torch.full((n, 4), float("nan")))
            data.save_features(features / f"{name}.features.safetensors", rows, {"test": seed})
    return features, annotations


def stage2_args(features, annotations, out, *extra):
    return ["--stage", "2", "--features", str(features), "--annotations", str(annotations), "--out", str(out),
            "--hidden", "64", "--batch-size", "256", "--epochs", "8", "--lr", "3e-3", "--min-lr", "1e-4",
            "--smoothing-windows", "5,11,25", "--device", "cpu", *extra]


# ---------------------------------------------------------------------------------- fusion head

def test_gated_fusion_computes_the_recipe_formula():
    torch.manual_seed(0)
    model = GatedFusion(visual_dim=6, audio_dim=5, hidden=4, num_classes=3).eval()
    for name in ("visual_mean", "visual_std", "audio_mean", "audio_std"):
        getattr(model, name).copy_(torch.rand_like(getattr(model, name)) + (0.5 if name.endswith("std") else -0.5))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    visual, audio = torch.randn(7, 6), torch.randn(7, 5)
    v = (visual / visual.norm(dim=1, keepdim=True) - model.visual_mean) / model.visual_std
    a = (audio / audio.norm(dim=1, keepdim=True) - model.audio_mean) / model.audio_std
    w1, b1, w2, b2 = model.gate[0].weight, model.gate[0].bias, model.gate[3].weight, model.gate[3].bias
    g = 1 / (1 + torch.exp(-(torch.relu(torch.cat([v, a], 1) @ w1.T + b1) @ w2.T + b2)))
    z = g * (v @ model.visual.weight.T + model.visual.bias) + (1 - g) * (a @ model.audio.weight.T + model.audio.bias)
    z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + 1e-5)
    z = z * model.norm.weight + model.norm.bias
    expected = z @ model.classifier.weight.T + model.classifier.bias
    with torch.no_grad():
        assert torch.allclose(model(visual, audio), expected, atol=1e-4)
        assert model(visual.half(), audio.half()).dtype == torch.float32

    for mode, missing in (("visual", "audio"), ("audio", "visual")):
        single = GatedFusion(6, 5, 4, 3, mode=mode).eval()
        assert single.gate is None and getattr(single, missing) is None
        inputs = {"visual": visual, "audio": audio}
        inputs[missing] = None  # the unused branch is not needed
        assert single(inputs["visual"], inputs["audio"]).shape == (7, 3)
    with pytest.raises(ValueError):
        GatedFusion(mode="both")

    model.train()  # input dropout (and dropout) only in training
    assert not torch.equal(model(visual, audio), model(visual, audio))


def test_normalisation_buffers_are_set_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    visual, audio = torch.randn(1000, 6) * 3 + 1, torch.randn(1000, 5).half()
    model = GatedFusion(6, 5, 4, 3)
    model.set_normalization(visual, audio, chunk=128)
    unit = F.normalize(visual, dim=1)
    assert torch.allclose(model.visual_mean, unit.mean(0), atol=1e-5)
    assert torch.allclose(model.visual_std, unit.std(0, unbiased=False), atol=1e-5)
    assert torch.allclose(model.audio_mean, F.normalize(audio.float(), dim=1).mean(0), atol=1e-4)
    index = torch.arange(0, 1000, 3)
    subset = GatedFusion(6, 5, 4, 3)
    subset.set_normalization(visual, audio, index=index, chunk=100)
    assert torch.allclose(subset.visual_mean, unit[index].mean(0), atol=1e-5)

    save_file(model.state_dict(), str(tmp_path / "fold0.safetensors"))
    state = load_file(tmp_path / "fold0.safetensors")
    assert {"visual_mean", "visual_std", "audio_mean", "audio_std"} <= set(state)
    fresh = GatedFusion(6, 5, 4, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.visual_std, model.visual_std)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(visual, audio), model.eval()(visual, audio))


# ------------------------------------------------------------------------------------ smoothing

@pytest.mark.parametrize("n", [1, 2, 7, 300])
@pytest.mark.parametrize("window", [1, 3, 11, 101])
def test_smoothing_matches_scipy_with_edges_replicated(n, window):
    logits = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + window))
    x = logits.double().numpy()
    half = window // 2
    references = {
        "median": median_filter(x, size=(window, 1), mode="nearest"),
        "mean": uniform_filter1d(x, window, axis=0, mode="nearest"),
        "gaussian": gaussian_filter1d(x, window / 6, axis=0, mode="nearest", radius=half) if window > 1 else x,
        "none": x,
    }
    for kind, expected in references.items():
        got = smooth_logits(logits, kind, window)
        assert got.shape == logits.shape and got.dtype == logits.dtype
        assert np.allclose(got.numpy(), expected, atol=1e-5), (kind, n, window)
    # chunked median over a long sequence is the same
    assert torch.equal(smooth_logits(logits, "median", window, chunk_elements=64),
                       smooth_logits(logits, "median", window))


def test_smoothing_rejects_bad_windows_and_kinds():
    for window in (0, 4, -3):
        with pytest.raises(ValueError, match="odd"):
            smooth_logits(torch.zeros(5, 8), "median", window)
    with pytest.raises(ValueError, match="kind"):
        smooth_logits(torch.zeros(5, 8), "bilateral", 5)


# ---------------------------------------------------------------------------------------- folds

def fold_labels(videos=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = {}
    for v in range(videos):
        names = [f"v{v}_left", f"v{v}_right"] if v % 3 == 0 else [f"v{v}"]
        for name in names:
            n = int(rng.integers(100, 3000))
            weights = rng.dirichlet(np.ones(8) * 0.5)
            labels[name] = torch.tensor(rng.choice(np.arange(-1, 8), size=n, p=np.r_[0.05, 0.95 * weights]))
    return labels


def test_folds_keep_videos_together_balanced_and_deterministic():
    labels = fold_labels()
    folds = train.assign_folds(labels, 5, seed=0)
    assert set(folds) == set(labels) and set(folds.values()) == set(range(5))
    for name in labels:
        if name.endswith("_left"):
            assert folds[name] == folds[name.replace("_left", "_right")]
    sizes = np.zeros(5)
    classes = np.zeros((5, 8))
    for name, y in labels.items():
        y = y[y >= 0]
        sizes[folds[name]] += len(y)
        classes[folds[name]] += np.bincount(y.numpy(), minlength=8)
    assert sizes.max() / sizes.min() < 1.1
    ratios = classes / classes.sum(1, keepdims=True)
    overall = classes.sum(0) / classes.sum()
    assert np.abs(ratios - overall).max() < 0.05
    assert train.assign_folds(labels, 5, seed=0) == folds
    assert train.assign_folds(dict(reversed(list(labels.items()))), 5, seed=0) == folds
    with pytest.raises(train.EmoError, match="at least 50 videos"):
        train.assign_folds(labels, 50)


# ------------------------------------------------------------------------------------ train.py

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("stage2"))


def test_fusion_beats_visual_and_smoothing_helps(synthetic, tmp_path):
    features, annotations = synthetic
    out = tmp_path / "cv"
    assert train.main(stage2_args(features, annotations, out, "--folds", "3")) is None
    report = json.loads((out / "report.json").read_text())
    table = report["ablation"]
    assert set(table) == {"visual", "audio", "fused"}
    for mode in table:
        assert len(table[mode]["raw"]["per_fold"]) == 3
    assert table["fused"]["raw"]["mean"] > table["visual"]["raw"]["mean"] + 0.1
    assert table["fused"]["raw"]["mean"] > table["audio"]["raw"]["mean"] + 0.1
    assert table["fused"]["smoothed"]["mean"] > table["fused"]["raw"]["mean"] + 0.05
    for run_ in report["runs"]["fused"]:
        assert run_["selection"]["smoothing"]["kind"] != "none"
    fold_of = report["fold_of_id"]
    assert all(fold_of[i] == fold_of[i.replace("_left", "_right")] for i in fold_of if i.endswith("_left"))
    assert "| fused smoothed |" in (out / "report.md").read_text()

    info = json.loads((out / "stage2.json").read_text())
    assert info["format"] == "emo-stage2/1" and info["mode"] == "fused" and info["folds"] == 3
    assert info["fold_files"] == ["fold0.safetensors", "fold1.safetensors", "fold2.safetensors"]
    assert info["smoothing"]["kind"] in ("median", "mean", "gaussian")
    ensemble, loaded = load_stage2(out)
    assert loaded == info and len(ensemble.models) == 3
    rows = load_file(features / "vid00.features.safetensors")
    with torch.no_grad():
        logits = ensemble(rows["visual"], rows["audio"])
        folds = [m(rows["visual"], rows["audio"]) for m in ensemble.models]
    assert logits.shape == (len(rows["visual"]), 8)
    assert torch.allclose(logits, torch.stack(folds).mean(0), atol=1e-6)


def test_selection_never_sees_the_reported_fold(synthetic, tmp_path):
    """Shuffle the labels of fold 0's videos in time (same counts, so the same folds): fold 0's
    chosen epoch, smoothing and weights stay the same; only its reported scores change."""
    features, annotations = synthetic
    assert train.main(stage2_args(features, annotations, tmp_path / "a", "--folds", "3", "--modes", "fused")) is None
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    fold0 = [i for i, k in report["fold_of_id"].items() if k == 0]
    shuffled = tmp_path / "annotations"
    rng = np.random.default_rng(1)
    for path in annotations.rglob("*.txt"):
        labels = data.read_annotation(path).numpy()
        if path.stem in fold0:
            labels = rng.permutation(labels)
        data.write_annotation(shuffled / path.relative_to(annotations), labels)
    assert train.main(stage2_args(features, shuffled, tmp_path / "b", "--folds", "3", "--modes", "fused")) is None
    adversarial = json.loads((tmp_path / "b" / "report.json").read_text())
    assert adversarial["fold_of_id"] == report["fold_of_id"]
    before, after = report["runs"]["fused"][0], adversarial["runs"]["fused"][0]
    assert before["selection"] == after["selection"]
    weights_a, weights_b = (load_file(tmp_path / d / "fold0.safetensors") for d in "ab")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert after["smoothed"] < before["smoothed"] - 0.2  # shuffled in time: the smoothing no longer fits


def test_official_protocol_trains_on_train_and_reports_validation(synthetic, tmp_path):
    features, annotations = synthetic
    out = tmp_path / "official"
    assert train.main(stage2_args(features, annotations, out, "--modes", "fused", "--epochs", "3",
                                  "--encoder", str(tmp_path))) is None
    info = json.loads((out / "stage2.json").read_text())
    assert info["folds"] == 0 and info["fold_files"] == ["fold0.safetensors"]
    assert info["encoder"] == str(tmp_path.resolve())
    report = json.loads((out / "report.json").read_text())
    validation = sorted(p.stem for p in (annotations / "Validation_Set").glob("*.txt"))
    assert report["runs"]["fused"][0]["report_ids"] == validation
    assert not set(report["runs"]["fused"][0]["selection"]["inner_ids"]) & set(validation)


def test_bad_stage2_runs_fail_with_one_clear_line(synthetic, tmp_path, capsys):
    features, annotations = synthetic

    def error(*argv):
        assert run(train.main, list(argv)) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's \r
        assert message.startswith("error: ")
        return message

    some = tmp_path / "some_features"
    some.mkdir()
    (some / "vid00.features.safetensors").write_bytes((features / "vid00.features.safetensors").read_bytes())
    assert "feature files are missing" in error(*stage2_args(some, annotations, tmp_path / "a"))
    assert "is not a folder" in error(*stage2_args(tmp_path / "nowhere", annotations, tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    assert "no annotations" in error(*stage2_args(features, tmp_path / "empty", tmp_path / "a"))
    assert "is not a folder" in error(*stage2_args(features, tmp_path / "missing", tmp_path / "a"))
    assert "at least 30 videos" in error(*stage2_args(features, annotations, tmp_path / "a", "--folds", "30"))
    assert "odd" in error(*stage2_args(features, annotations, tmp_path / "a", "--smoothing-windows", "10"))
    assert "--folds must be" in error(*stage2_args(features, annotations, tmp_path / "a", "--folds", "1"))
    assert "--modes" in error(*stage2_args(features, annotations, tmp_path / "a", "--modes", "fused,both"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in features.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "vid00.features.safetensors").write_bytes(b"not a safetensors file")
    assert "vid00.features.safetensors" in error(*stage2_args(broken, annotations, tmp_path / "a"))
    only_train = tmp_path / "only_train"
    for path in (annotations / "Train_Set").glob("*.txt"):
        data.write_annotation(only_train / "Train_Set" / path.name, data.read_annotation(path))
    assert "Validation_Set" in error(*stage2_args(features, only_train, tmp_path / "a"))
    # a fold whose videos have no labelled frame at all
    unlabelled = tmp_path / "unlabelled"
    for path in annotations.rglob("*.txt"):
        labels = data.read_annotation(path)
        data.write_annotation(unlabelled / path.relative_to(annotations),
                              labels if path.stem not in ("vid00", "vid02") else torch.full_like(labels, -1))
    message = error(*stage2_args(features, unlabelled, tmp_path / "a", "--folds", "14"))
    assert "no labelled frames" in message
    assert not (tmp_path / "a" / "stage2.json").exists()


def test_stage2_extracts_its_features_first(tmp_path):
    """train.py --stage 2 --cropped-aligned/--videos: features of every id extracted (from the aligned crops,
    audio from the videos), then the folds trained; a second run reuses the feature files."""
    import hf_checkpoints as hf
    from models import CLASSES, save_checkpoint
    from models import EmotionClassifier, MoEHead, ViT
    synth = tmp_path / "synth"
    emo.synthesize(emo.SynthConfig(out=str(synth), videos=6, frames=40, width=96, height=72, images=0))
    torch.manual_seed(0)
    backbone = hf.save(hf.dinov2(), tmp_path / "dinov2")
    encoder = EmotionClassifier(ViT.from_pretrained(backbone), MoEHead(64, len(CLASSES)))
    save_checkpoint(tmp_path / "stage1" / "best", encoder.state_dict(),
                    {"config": {"backbone": str(backbone), "revision": None, "head": "moe"}})
    w2v = hf.save(hf.wav2vec2(**hf.TINY_W2V_LARGE), tmp_path / "w2v")
    argv = ["--stage", "2", "--annotations", str(synth / "annotations"), "--videos", str(synth / "videos"),
            "--cropped-aligned", str(synth / "cropped_aligned"), "--encoder", str(tmp_path / "stage1" / "best"),
            "--audio-model", str(w2v), "--out", str(tmp_path / "run"), "--folds", "2", "--inner-folds", "2",
            "--epochs", "2", "--batch-size", "64", "--smoothing-windows", "5", "--modes", "fused"]
    train.main(argv)
    info = json.loads((tmp_path / "run" / "stage2.json").read_text())
    assert info["encoder"] == str((tmp_path / "stage1" / "best").resolve()) and len(info["fold_files"]) == 2
    files = sorted((tmp_path / "run" / "features").glob("*.features.safetensors"))
    ids = [p.stem for p in (synth / "annotations" / "EXPR_Recognition_Challenge").glob("*/*.txt")]
    assert sorted(p.name.removesuffix(".features.safetensors") for p in files) == sorted(ids)
    stamps = [p.stat().st_mtime_ns for p in files]
    train.main(argv)
    assert [p.stat().st_mtime_ns for p in files] == stamps
