"""data.py: decoding (mp4, avi, silent, variable frame rate, rotation, broken files) and the synthetic dataset."""
import json
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import data
import emo
import models
from models import CLASSES, EmoError

SMALL = dict(videos=4, frames=60, width=96, height=72, images=2)


def synth(out, seed=0):
    return emo.synthesize(emo.SynthConfig(out=str(out), seed=seed, **SMALL))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth(out)


def video_path(dataset, name):
    out, manifest = dataset
    record = next(r for r in manifest["videos"] if r["video"] == name)
    return out / record["file"], record


def annotation_files(out):
    return sorted((out / "annotations" / "EXPR_Recognition_Challenge").glob("*/*.txt"))


def read_labels(path):
    lines = Path(path).read_text().splitlines()
    return lines[0], [int(v) for v in lines[1:]]


def all_frames(path, batch_size=64):
    batches = list(data.iter_frames(path, batch_size))
    return torch.cat([f for f, _ in batches]), torch.cat([t for _, t in batches])


def spectral_centroid(wave, sample_rate=16000):
    spectrum = torch.fft.rfft(wave.double()).abs()
    freqs = torch.fft.rfftfreq(wave.numel(), 1 / sample_rate)
    return float((spectrum * freqs).sum() / spectrum.sum())


# ------------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("name, container", [("video00", "mp4"), ("video01", "avi")])
def test_decode_mp4_and_avi(dataset, name, container):
    path, record = video_path(dataset, name)
    assert path.suffix == f".{container}"
    info = data.probe(path)
    assert (info.width, info.height, info.rotation, info.has_audio) == (96, 72, 0, True)
    assert info.fps == pytest.approx(25.0) and info.frames == record["frames"]
    frames, times = all_frames(path, batch_size=16)
    assert frames.dtype == torch.uint8 and frames.shape == (record["frames"], 72, 96, 3)
    assert times.dtype == torch.float64
    assert torch.allclose(times, torch.arange(record["frames"], dtype=torch.float64) / 25, atol=1e-6)
    wave, has_audio = data.read_audio(path)
    assert has_audio and wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - info.duration * 16000) < 0.05 * 16000
    assert 0.01 < wave.abs().max() <= 1.5


def test_batches_are_bounded_and_consistent(dataset):
    path, record = video_path(dataset, "video00")
    sizes = [f.shape[0] for f, _ in data.iter_frames(path, batch_size=7)]
    assert max(sizes) == 7 and sum(sizes) == record["frames"]
    small, small_times = all_frames(path, batch_size=7)
    large, large_times = all_frames(path, batch_size=1000)
    assert torch.equal(small, large) and torch.equal(small_times, large_times)


def test_video_without_audio(dataset):
    out, manifest = dataset
    (name,) = manifest["no_audio"]
    path, record = video_path(dataset, name)
    assert data.probe(path).has_audio is False
    wave, has_audio = data.read_audio(path)
    assert has_audio is False and wave.numel() == 0 and wave.dtype == torch.float32
    assert all_frames(path)[0].shape[0] == record["frames"]


def test_frame_count_matches_annotations(dataset):
    out, manifest = dataset
    for record in manifest["videos"]:
        n = all_frames(out / record["file"])[0].shape[0]
        assert n == record["frames"]
        for annotation_id in record["ids"]:
            _, labels = read_labels(out / "annotations" / "EXPR_Recognition_Challenge" / record["split"]
                                    / f"{annotation_id}.txt")
            assert len(labels) == n, annotation_id


def test_audio_length_matches_duration(dataset):
    out, manifest = dataset
    for record in manifest["videos"]:
        if record["audio"]:
            wave, has_audio = data.read_audio(out / record["file"])
            duration = record["frames"] / manifest["fps"]
            assert has_audio and abs(wave.numel() - duration * 16000) < 0.05 * 16000, record["video"]


def write_test_video(path, pts, time_base=Fraction(1, 1000), rotation=None, size=(64, 48)):
    """H.264 .mp4 whose frame i has presentation time pts[i] * time_base; a bright top-left corner."""
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, t in enumerate(pts):
            image = np.full((height, width, 3), 40, np.uint8)
            image[:16, :16] = 250  # marks the coded picture's top-left corner
            image[-8:, :, 2] = 200  # a blue bottom band
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_variable_frame_rate_gives_true_times(tmp_path):
    pts = [0, 40, 100, 130, 260, 300, 310, 500, 540, 1000, 1033, 1200]
    path = tmp_path / "vfr.mp4"
    write_test_video(path, pts)
    frames, times = all_frames(path, batch_size=5)
    assert frames.shape[0] == len(pts)
    assert times.tolist() == pytest.approx([p / 1000 for p in pts], abs=1e-6)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation)")
    path = tmp_path / f"rotated{rotation}.mp4"
    write_test_video(path, list(range(0, 200, 40)), rotation=rotation)
    info = data.probe(path)
    assert info.rotation == rotation
    frames, _ = all_frames(path)
    coded = torch.zeros(48, 64)
    coded[:16, :16] = 1
    expected = torch.rot90(coded, rotation // 90)  # displayed = coded picture turned counter-clockwise
    assert (info.height, info.width) == tuple(expected.shape) == tuple(frames.shape[1:3])
    bright = frames[0].float().mean(-1) > 150
    assert torch.equal(bright, expected.bool())


def test_broken_files_raise_one_clear_line(tmp_path, dataset, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    good, _ = video_path(dataset, "video00")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    for path in (text, truncated, garbage, tmp_path / "missing.mp4"):
        for read in (data.probe, all_frames, data.read_audio):
            with pytest.raises(EmoError) as error:
                read(path)
            message = str(error.value)
            assert "\n" not in message and str(path) in message
    assert models.run(data.main, ["probe", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(EmoError, match="no video stream"):
        data.probe(path)
    with pytest.raises(EmoError, match="no video stream"):
        all_frames(path)


# ---------------------------------------------------------------------------- synthetic dataset

def test_layout(dataset):
    out, manifest = dataset
    files = annotation_files(out)
    assert {f.parent.name for f in files} == {"Train_Set", "Validation_Set"}
    for f in files:
        header, labels = read_labels(f)
        assert header == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
        assert set(labels) <= set(range(-1, 8)) and -1 in labels
        crops = sorted((out / "cropped_aligned" / f.stem).iterdir())
        assert crops and all(re.fullmatch(r"\d{5}\.jpg", c.name) for c in crops)
        numbers = {int(c.stem) for c in crops}
        assert min(numbers) >= 1 and max(numbers) <= len(labels)
        assert len(numbers) < len(labels)  # frames without a face have no crop
        assert all(labels[i - 1] != -1 for i in numbers)
    (pair,) = manifest["two_person"]
    record = next(r for r in manifest["videos"] if r["video"] == pair)
    assert record["ids"] == [f"{pair}_left", f"{pair}_right"] and record["file"].endswith(f"/{pair}.mp4")
    assert not (out / record["file"]).with_name(f"{pair}_left.mp4").exists()
    boxes = json.loads((out / "boxes" / f"{pair}.json").read_text())["boxes"]
    left = [b for b in boxes[f"{pair}_left"] if b]
    right = [b for b in boxes[f"{pair}_right"] if b]
    assert max(b[2] for b in left) < min(b[0] for b in right)  # left person on the left
    for r in manifest["videos"]:
        per_id = json.loads((out / "boxes" / f"{r['video']}.json").read_text())["boxes"]
        assert set(per_id) == set(r["ids"]) and all(len(v) == r["frames"] for v in per_id.values())
    assert {r["container"] for r in manifest["videos"]} == {"mp4", "avi"}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(CLASSES)
    assert all(len(list((out / "images" / c).glob("*.jpg"))) == SMALL["images"] for c in CLASSES)
    splits = manifest["splits"]
    assert sorted(splits["Train_Set"] + splits["Validation_Set"]) == sorted(f.stem for f in files)


def test_synth_is_deterministic(dataset, tmp_path):
    out, manifest = dataset
    again = synth(tmp_path / "again")
    assert again == manifest
    first, second = annotation_files(out), annotation_files(tmp_path / "again")
    assert [f.relative_to(out) for f in first] == [f.relative_to(tmp_path / "again") for f in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    files = sorted(f.relative_to(out) for f in out.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "again") for f in (tmp_path / "again").rglob("*") if f.is_file())
    for f in files:  # annotations, crops, images, boxes, manifest: byte for byte
        if f.parts[0] != "videos":
            assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    for record in manifest["videos"]:
        a, b = all_frames(out / record["file"])[0], all_frames(tmp_path / "again" / record["file"])[0]
        assert torch.equal(a, b), record["video"]  # videos: the same decoded frames
        if record["audio"]:  # and the same decoded sound
            assert torch.equal(data.read_audio(out / record["file"])[0],
                               data.read_audio(tmp_path / "again" / record["file"])[0]), record["video"]
    other = synth(tmp_path / "other", seed=1)
    assert [r["frames"] for r in other["videos"]] != [r["frames"] for r in manifest["videos"]]


def test_lookalike_classes_sound_different(tmp_path):
    fear, surprise, happy = (CLASSES.index(c) for c in ("Fear", "Surprise", "Happiness"))
    rng = np.random.default_rng(0)
    faces = {label: np.asarray(emo.draw_face(96, emo.EXPRESSIONS[CLASSES[label]], (200, 170, 140)),
                               dtype=np.float32) for label in (fear, surprise, happy)}
    assert np.abs(faces[fear] - faces[surprise]).mean() < 0.5 * np.abs(faces[fear] - faces[happy]).mean()
    centroids = {}
    for label in (fear, surprise):
        n = 50
        audio = emo.render_audio({"x": np.full(n, label)}, n, 25, 44100, rng)
        path = tmp_path / f"{CLASSES[label]}.mp4"
        data.write_video(path, np.zeros((n, 64, 64, 3), np.uint8), 25, audio, 44100, "mp4")
        wave, has_audio = data.read_audio(path)
        assert has_audio
        centroids[label] = spectral_centroid(wave)
    assert centroids[fear] > 1.5 * centroids[surprise]


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        emo.main(["synth", "--help"])
    assert done.value.code == 0 and "--seed" in capsys.readouterr().out
    assert models.run(emo.main, ["synth", str(tmp_path / "x"), "--videos", "2"]) == 2
    assert "at least 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        emo.main(["synth", str(tmp_path / "x"), "--size", "big"])
    assert done.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err


def test_synth_refuses_to_mix_with_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(EmoError, match="not empty"):
        synth(tmp_path)
    with pytest.raises(EmoError, match="no synthetic-dataset manifest"):
        emo.synthesize(emo.SynthConfig(out=str(tmp_path), overwrite=True, **SMALL))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("rule", ["left", "right", "largest"])
def test_tracker_rules_on_the_two_person_clip(dataset, rule):
    """The synthetic two-person video's true boxes, shuffled per frame, as the detector's output:
    the left / right rule must give back the <video>_left / <video>_right person."""
    out, manifest = dataset
    (pair,) = manifest["two_person"]
    truth = json.loads((out / "boxes" / f"{pair}.json").read_text())["boxes"]
    ids = [f"{pair}_left", f"{pair}_right"]
    num_frames = len(truth[ids[0]])
    detections = []
    for f in range(num_frames):
        boxes = [truth[i][f] for i in (ids if f % 2 else ids[::-1]) if truth[i][f] is not None]
        detections.append((torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.full((len(boxes),), 0.9)))
    track = data.choose_track(detections, num_frames, rule, data.TrackConfig(smooth=1))
    if rule == "largest":
        areas = {i: np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in truth[i] if b]) for i in ids}
        rule = "left" if areas[ids[0]] > areas[ids[1]] else "right"
    expected = truth[f"{pair}_{rule}"]
    for f in range(num_frames):
        if expected[f] is not None:
            assert track.detected[f] and torch.allclose(track.boxes[f], torch.tensor(expected[f], dtype=torch.float32))
        else:
            assert not track.detected[f]
