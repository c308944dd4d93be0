"""Memory stays bounded on a long video: decoding ten times as many frames, or streaming ten times as much sound
through wav2vec 2.0 into per-frame features, must not raise the peak RSS.

Two videos of the same size, H.264 + AAC .mp4, 150 and 1500 frames, are written frame by frame (data.write_video
takes the whole (frames, H, W, 3) array at once, so a small streaming PyAV writer here stands in for it). Each is
then decoded in a fresh process (forked from one that has imported emo), so the peak resident set size (VmHWM)
belongs to that video alone.
"""
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import hf_checkpoints as hf

WIDTH, HEIGHT, FPS, SAMPLE_RATE = 320, 240, 25, 44100
SHORT, LONG = 150, 1500
REPO = Path(__file__).resolve().parents[1]

# Imports emo's decoding once (torch & co. take seconds to import), then for each video path read from stdin forks a
# fresh process that resets its peak RSS to its current RSS (clear_refs 5), iterates all frames in batches of 32
# with a small reduction per batch, notes the peak, reads the whole audio track and notes the peak again. One JSON
# line per video. Each video gets a process of its own that nothing was decoded in before.
CHILD = r"""
import json, os, sys, traceback
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
import torch
import data
from models import Wav2Vec2
torch.set_num_threads(1)
w2v = Wav2Vec2.from_pretrained(sys.argv[1])
for line in sys.stdin:
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        continue
    try:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        start = rss_kib("VmHWM")
        frames = batches = 0
        brightness = 0.0
        for batch, times in data.iter_frames(line.strip(), batch_size=32):
            brightness += float(batch[:, ::4, ::4].float().mean())
            frames += len(batch)
            batches += 1
        after_frames = rss_kib("VmHWM")
        times = data.frame_presentation_times(line.strip())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        sound_start = rss_kib("VmHWM")
        # 2 s chunks, so that both videos run full chunks: a chunk's activations are the bounded part
        features, present = data.frame_audio(w2v, line.strip(), times, data.FeatureConfig(chunk_seconds=2.0))
        sound_peak = rss_kib("VmHWM")
        samples = sum(len(block) for block in data.AudioReader(line.strip()))
        print(json.dumps({"frames": frames, "batches": batches, "brightness": brightness / batches,
                          "start_kib": start, "frames_peak_kib": after_frames, "sound_start_kib": sound_start,
                          "sound_peak_kib": sound_peak, "audio_samples": samples, "has_audio": bool(present.all()),
                          "feature_rows": len(features)}), flush=True)
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
    finally:
        os._exit(0)
"""


def frame_at(index, base):
    """A moving, changing picture: a scrolling gradient plus a square that travels across the frame."""
    image = np.roll(base, 3 * index, axis=1)
    image[..., 2] = base[..., 2] + np.uint8(2 * index % 256)  # uint8: wraps around
    x = int((WIDTH - 48) * (0.5 + 0.5 * math.sin(index / 20)))
    y = int((HEIGHT - 48) * (0.5 + 0.5 * math.cos(index / 31)))
    image[y:y + 48, x:x + 48] = (255 - index % 256, 40, index % 256)
    return image


def write_streaming(path, frames):
    """H.264 + stereo AAC .mp4 of `frames` procedurally generated frames, one frame (and its audio) at a time."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xs * 255 // WIDTH, ys * 255 // HEIGHT, (xs + ys) % 256], -1).astype(np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=FPS, options={"crf": "28", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.codec_context.thread_count = 1
        sound = out.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        written, chunk = 0, 1024
        for i in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(frame_at(i, base), format="rgb24")):
                out.mux(packet)
            while written < (i + 1) * SAMPLE_RATE // FPS:  # the audio up to this frame's end, interleaved
                t = (written + np.arange(chunk)) / SAMPLE_RATE
                tone = (0.3 * np.sin(2 * np.pi * (220 + 20 * t) * t)).astype(np.float32)
                audio = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                audio.sample_rate, audio.pts, audio.time_base = SAMPLE_RATE, written, Fraction(1, SAMPLE_RATE)
                for packet in sound.encode(audio):
                    out.mux(packet)
                written += chunk
        for stream in (video, sound):
            for packet in stream.encode():
                out.mux(packet)
    return written


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    # the measuring process imports while the videos are written
    w2v = hf.save(hf.wav2vec2(**hf.TINY_W2V_LARGE), tmp_path_factory.mktemp("w2v"))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(w2v)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        folder = tmp_path_factory.mktemp("memory")
        written = {}
        for name, frames in (("short", SHORT), ("long", LONG)):
            written[name] = (folder / f"{name}.mp4", frames, write_streaming(folder / f"{name}.mp4", frames))
        out, err = child.communicate("".join(f"{path}\n" for path, _, _ in written.values()), timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 2 and not any("error" in r for r in lines), (lines, err[-2000:])
    return {name: {**r, "written_frames": frames, "written_samples": samples}
            for (name, (_, frames, samples)), r in zip(written.items(), lines)}


def test_decoding_memory_does_not_grow_with_length(measured):
    short, long = measured["short"], measured["long"]
    mib = {name: {k[:-4]: round(v / 1024, 1) for k, v in r.items() if k.endswith("_kib")}
           for name, r in measured.items()}
    print(f"\nRSS in MiB: at the start, peak after the frames, before and after the sound: {json.dumps(mib)}")
    for r in (short, long):
        assert r["frames"] == r["written_frames"] and r["batches"] == math.ceil(r["frames"] / 32)
        assert 0 < r["brightness"] < 255 and r["has_audio"] and r["feature_rows"] == r["frames"]
        # 16 kHz mono; AAC pads the track by up to a couple of 1024-sample frames at each end
        expected = r["written_samples"] * 16000 / SAMPLE_RATE
        assert abs(r["audio_samples"] - expected) < 3 * 1024 * 16000 / SAMPLE_RATE + 16000 * 0.1
    # ten times the frames: the peak must stay within 15% (plus 8 MiB) of the short video's, and so must
    # the part of it that decoding added on top of what the process held when it started
    assert long["frames_peak_kib"] <= 1.15 * short["frames_peak_kib"] + 8 * 1024, mib
    short_growth = short["frames_peak_kib"] - short["start_kib"]
    long_growth = long["frames_peak_kib"] - long["start_kib"]
    assert long_growth <= 1.15 * short_growth + 8 * 1024, mib
    # the sound, streamed through wav2vec 2.0 (tiny, 64-d): 60 s of it may hold no more than 6 s did, within
    # the same margins (seen: +6 MiB); holding the whole track, as decoded (44.1 kHz stereo float) and at
    # 16 kHz, would add about 25 MiB
    short_sound = short["sound_peak_kib"] - short["sound_start_kib"]
    long_sound = long["sound_peak_kib"] - long["sound_start_kib"]
    assert long_sound <= 1.15 * short_sound + 8 * 1024, mib
