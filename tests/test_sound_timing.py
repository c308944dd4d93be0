"""The sound on the video's clock: audio streams that start late or early, have a gap, end early or late, or
carry damaged packets, made with PyAV (FFmpeg's own muxers and encoders) at known offsets."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import data
import hf_checkpoints as hf
from models import Wav2Vec2

FPS, RATE = 25, 44100


def write_clip(path, seconds=4.0, video_start=0.0, audio=(), size=64):
    """An .mp4 with `seconds` of H.264 video whose first frame is at video_start on the file's clock, and
    AAC stereo audio made of (start time, mono wave at RATE) pieces, each placed at its own time."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": "veryfast"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        sound = out.add_stream("aac", rate=RATE, layout="stereo") if audio else None
        if sound is not None:
            sound.bit_rate = 256_000
        first = round(video_start * FPS)
        texture = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)  # ~a real bit rate
        for i in range(round(seconds * FPS)):
            frame = data.yuv420p_frame(texture[i % len(texture)])
            frame.pts = first + i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        for start, wave in audio:
            origin = round(start * RATE)
            for offset in range(0, len(wave) - 1023, 1024):
                piece = wave[offset:offset + 1024].astype(np.float32)
                frame = av.AudioFrame.from_ndarray(np.stack([piece, piece]), format="fltp", layout="stereo")
                frame.sample_rate, frame.time_base, frame.pts = RATE, Fraction(1, RATE), origin + offset
                for packet in sound.encode(frame):
                    out.mux(packet)
        if sound is not None:
            for packet in sound.encode():
                out.mux(packet)
    return path


def noise(seconds, seed=0, level=0.1):
    return np.random.default_rng(seed).normal(0, level, round(seconds * RATE)).astype(np.float32)


def hum(seconds, level=0.1):
    """A few steady harmonics: AAC codes them almost exactly, so a burst's effect stays where it is."""
    t = np.arange(round(seconds * RATE)) / RATE
    return (level * sum(np.sin(2 * np.pi * 110 * k * t + k) / k for k in (1, 2, 3, 5))).astype(np.float32)


def with_burst(wave, at, seconds=0.2, level=0.15, hz=900.0):
    """The wave with a loud tone from `at` seconds (of the wave) for `seconds`."""
    wave = wave.copy()
    start, n = round(at * RATE), round(seconds * RATE)
    wave[start:start + n] += level * np.sin(2 * np.pi * hz * np.arange(n) / RATE).astype(np.float32)
    return wave


def frame_times_of(path):
    return data.frame_presentation_times(path)


@pytest.fixture(scope="module")
def local_w2v(tmp_path_factory):
    """wav2vec 2.0 without transformer layers: each step sees only its own 25 ms, so a sound's effect stays
    where it is in time."""
    folder = tmp_path_factory.mktemp("w2v")
    return Wav2Vec2.from_pretrained(hf.save(hf.wav2vec2(**{**hf.TINY_W2V_LARGE, "num_hidden_layers": 0}), folder))


CFG = data.FeatureConfig(audio_layers=1)


def flags(path, w2v):
    times = frame_times_of(path)
    audio, present = data.frame_audio(w2v, path, times, CFG)
    return data.frame_centres(times), audio, present


def test_audio_delayed_by_two_seconds(tmp_path, local_w2v):
    path = write_clip(tmp_path / "late.mp4", 4.0, audio=[(2.0, noise(2.0))])
    reader = data.AudioReader(path)
    wave = np.concatenate(list(reader))
    assert abs(reader.start - 2.0) < 0.03 and abs(len(wave) / 16000 - 2.0) < 0.1  # AAC priming: ~23 ms early
    centres, _, present = flags(path, local_w2v)
    assert len(centres) == 100
    assert not present[centres < 1.97].any() and present[(centres > 2.03) & (centres < 3.95)].all()


def test_audio_advanced_by_one_second_and_a_burst_at_a_known_time(tmp_path, local_w2v):
    # The video starts at 1 s on the file's clock, the sound at 0: the sound is one second ahead of the
    # picture. A burst at 2.5 s of the sound plays at 1.5 s into the video (frames 37-42).
    base = hum(5.0)
    plain = write_clip(tmp_path / "early.mp4", 4.0, video_start=1.0, audio=[(0.0, base)])
    burst = write_clip(tmp_path / "burst.mp4", 4.0, video_start=1.0, audio=[(0.0, with_burst(base, 2.5))])
    centres, quiet, present = flags(plain, local_w2v)
    assert abs(float(frame_times_of(plain)[0]) - 1.0) < 1e-6 and present.all()
    _, loud, _ = flags(burst, local_w2v)
    change = (loud - quiet).norm(dim=1) / quiet.norm(dim=1).mean()
    holding = (centres > 2.7 - 0.5) & (centres < 2.5 + 0.5)  # windows of +/- 0.5 s that hold all of the burst
    far = (centres < 2.5 - 0.6) | (centres > 2.7 + 0.6)      # windows that hold none of it
    assert holding.sum() >= 20 and far.sum() >= 40
    assert change[holding].min() > 5 * change[far].max()
    strong = change > change.max() / 2
    middle = float((centres[strong] * change[strong]).sum() / change[strong].sum())
    assert abs(middle - 2.6) <= 0.1  # the change is centred on the burst, on the video's clock


def test_gap_and_lengths(tmp_path, local_w2v):
    gap = write_clip(tmp_path / "gap.mp4", 4.0, audio=[(0.0, noise(1.5)), (2.5, noise(1.5, seed=2))])
    reader = data.AudioReader(gap)
    total = sum(len(block) for block in reader)
    assert len(reader.gaps) == 1 and abs(reader.gaps[0][0] - 1.5) < 0.05 and abs(reader.gaps[0][1] - 2.5) < 0.05
    assert abs(total / 16000 - (reader.end - reader.start)) < 1e-6  # the gap is silence in the wave
    centres, _, present = flags(gap, local_w2v)
    assert not present[(centres > 1.55) & (centres < 2.45)].any()
    assert present[(centres > 0.05) & (centres < 1.45)].all() and present[(centres > 2.55) & (centres < 3.95)].all()

    short = write_clip(tmp_path / "short.mp4", 4.0, audio=[(0.0, noise(2.0))])
    centres, audio, present = flags(short, local_w2v)
    assert present[(centres > 0.05) & (centres < 1.95)].all() and not present[centres > 2.05].any()
    assert torch.isfinite(audio).all() and audio.shape == (100, 64)

    long = write_clip(tmp_path / "long.mp4", 2.0, audio=[(0.0, noise(5.0))])
    centres, audio, present = flags(long, local_w2v)
    assert len(centres) == 50 and present.all()


def test_damaged_packets_cost_only_their_own_samples(tmp_path, local_w2v, capsys):
    good = write_clip(tmp_path / "good.mp4", 8.0, audio=[(0.0, noise(8.0, seed=3))], size=96)
    raw = bytearray(good.read_bytes())
    start = len(raw) // 3
    rng = np.random.default_rng(0)
    raw[start:start + 20_000] = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(raw))
    times = frame_times_of(damaged)
    assert len(times) >= 0.9 * 200
    reader = data.AudioReader(damaged)
    decoded = sum(len(block) for block in reader) / 16000
    assert reader.lost_seconds > 0 and decoded > 7.0
    audio, present = data.frame_audio(local_w2v, damaged, times, CFG)
    assert torch.isfinite(audio).all() and 0.5 < present.float().mean() < 1.0
    err = capsys.readouterr().err
    assert err.count("could not be decoded (damaged packets)") == 1
    assert "Traceback" not in err
