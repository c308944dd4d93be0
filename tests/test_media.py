"""Face tracking, multi-scale crops and frame-aligned audio features."""
import os

import numpy as np
import pytest
import torch

import hf_checkpoints as hf
from data import (DetectConfig, TrackConfig, align_audio, audio_step_features, choose_track, crop_decoded,
                  crop_faces, detect_video, frame_times, iter_face_crops, iter_step_features, link_tracks, track_video,
                  write_video)
from models import Wav2Vec2, normalize_waveform


def test_frame_alignment_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    steps = torch.randn(300, 8, generator=generator, dtype=torch.float64).float()
    step_times = 0.0125 + 0.02 * torch.arange(300, dtype=torch.float64)
    times = torch.cat([frame_times(160, 25.0), torch.tensor([7.5, 9.0, 30.0], dtype=torch.float64)])
    expected = []
    for t in times:
        inside = (step_times >= t - 0.5) & (step_times <= t + 0.5)
        expected.append(steps[inside].double().mean(0) if inside.any() else steps[(step_times - t).abs().argmin()])
    expected = torch.stack(expected).float()
    for block in (4096, 7):
        assert (align_audio(steps, times, block=block) - expected).abs().max() <= 1e-6
    assert align_audio(torch.zeros(0, 8), times).shape == (len(times), 8)


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory):
    return Wav2Vec2.from_pretrained(hf.save(hf.wav2vec2(**hf.TINY_W2V_LARGE), tmp_path_factory.mktemp("w2v")))


def test_audio_that_fits_one_chunk_is_one_pass(tiny_w2v):
    wave = torch.randn(3 * 16000 + 123, generator=torch.Generator().manual_seed(1))
    got = audio_step_features(tiny_w2v, wave, num_layers=2)
    with torch.no_grad():
        _, hidden = tiny_w2v(normalize_waveform(wave[None]))
    assert (got - torch.stack(hidden[-2:]).mean(0)[0]).abs().max() <= 1e-5


def test_chunk_borders_see_their_context(tmp_path):
    # Without transformer layers a step's feature depends only on nearby audio: each chunk must equal one
    # pass over its own stretch of samples (its context on both sides, normalised on its own), and the
    # stream must give the same features whatever the sizes of the blocks the wave arrives in.
    local = Wav2Vec2.from_pretrained(hf.save(hf.wav2vec2(**{**hf.TINY_W2V_LARGE, "num_hidden_layers": 0}), tmp_path))
    wave = torch.randn(5 * 16000, generator=torch.Generator().manual_seed(2))
    chunked = audio_step_features(local, wave, num_layers=1, chunk_seconds=0.7, context_seconds=0.3)
    total = local.num_steps(len(wave))
    assert chunked.shape == (total, 64)
    chunk, context = 35, 15  # steps of 20 ms
    expected = []
    for first in range(0, total, chunk):
        last = min(first + chunk, total)
        start, stop = max(first - context, 0), min(last + context, total)
        samples = wave[start * 320:(stop - 1) * 320 + 400] if stop < total else wave[start * 320:]
        with torch.no_grad():
            _, hidden = local(normalize_waveform(samples[None]))
        expected.append(hidden[-1][0, first - start:last - start])
    assert (torch.cat(expected) - chunked).abs().max() <= 1e-5
    sizes = np.random.default_rng(0).integers(1, 9000, 200).cumsum()
    blocks = np.split(wave.numpy(), sizes[sizes < len(wave)])
    streamed = torch.cat([f for _, f in iter_step_features(local, iter(blocks), 1, 0.7, 0.3)])
    assert torch.equal(streamed, chunked)


def two_people(num_frames=60):
    """Detections of a left (small) and a right (large) face, with misses and one spurious box."""
    detections = []
    for i in range(num_frames):
        boxes, scores = [], []
        if i % 7 != 3:                          # the left person is missed now and then
            boxes.append([20 + i * 0.2, 40, 60 + i * 0.2, 90]); scores.append(0.9)
        if not 30 <= i < 50:                    # the right person leaves for 20 frames
            boxes.append([150, 30, 230, 130]); scores.append(0.95)
        if i == 10:
            boxes.append([100, 200, 130, 240]); scores.append(0.6)
        detections.append((torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores)))
    return detections


def test_tracker_picks_people_by_rule():
    cfg = TrackConfig(fill_gap=5, smooth=1)
    left = choose_track(two_people(), 60, "left", cfg)
    right = choose_track(two_people(), 60, "right", cfg)
    largest = choose_track(two_people(), 60, "largest", cfg)
    assert torch.equal(largest.boxes.nan_to_num(), right.boxes.nan_to_num())
    # misses of 1 frame between two detections are filled; frame 59, after the last detection, is not
    assert (left.boxes[:59, 0] < 80).all() and not left.boxes[:59].isnan().any() and left.boxes[59].isnan().all()
    assert left.detected.sum() == sum(1 for i in range(60) if i % 7 != 3)
    assert right.detected[30:50].sum() == 0
    assert right.boxes[30:50].isnan().all()  # a 20-frame absence is longer than fill_gap: left unknown
    assert choose_track([(torch.zeros(0, 4), torch.zeros(0))] * 5, 5) is None


def test_filling_never_reaches_past_a_track():
    # A face from frame 100 on (a test pattern before it), missed on frames 110-113 and 130-149, gone after 159.
    box = torch.tensor([[40.0, 40.0, 100.0, 100.0]])
    detections = [(box + (i - 100) * 0.5 if 100 <= i < 160 and not (110 <= i < 114 or 130 <= i < 150)
                   else torch.zeros(0, 4), torch.ones(1 if 100 <= i < 160 and not (110 <= i < 114 or 130 <= i < 150)
                                                      else 0)) for i in range(200)]
    track = choose_track(detections, 200, cfg=TrackConfig(fill_gap=12, smooth=1))
    known = ~track.boxes.isnan().any(1)
    assert not known[:100].any() and not known[160:].any()  # nothing before the first or after the last detection
    assert known[100:130].all() and not known[130:150].any() and known[150:160].all()
    assert not track.detected[110:114].any()
    expected = box + (torch.arange(110, 114)[:, None] - 100) * 0.5  # interpolated between frames 109 and 114
    assert torch.allclose(track.boxes[110:114], expected, atol=1e-5)


def test_a_fast_face_seen_every_third_frame_stays_one_track():
    # A 100 px face speeding up (40, 60, 70, 80 px between looks): its last box overlaps the next detection
    # by less than iou_match from the second step on, the box moved on at its speed by far more.
    nothing = (torch.zeros(0, 4), torch.zeros(0))
    detections = [nothing] * 15
    for look, x in enumerate([0, 40, 100, 170, 250]):
        detections[3 * look] = (torch.tensor([[x, 50.0, x + 100.0, 150.0]]), torch.ones(1))
    (track,) = link_tracks(detections)
    assert sorted(track) == [0, 3, 6, 9, 12]
    assert len(link_tracks([d for d in detections[:7]] + [nothing] * 30 + [detections[12]])) == 2  # far away later
    cfg = TrackConfig(smooth=1, min_track_fraction=0.5)
    assert choose_track(detections, 15, cfg=cfg) is None  # 5 detections in 15 frames...
    found = choose_track(detections, 15, cfg=cfg, every=3)  # ...but in the 5 frames the detector looked at
    assert torch.allclose(found.boxes[4], torch.tensor([60.0, 50.0, 160.0, 150.0]))


def test_smoothing_keeps_a_still_box_and_calms_jitter():
    jitter = [(torch.tensor([[50 + (-2) ** (i % 2), 50, 90 + (-2) ** (i % 2), 90]], dtype=torch.float32),
               torch.tensor([0.9])) for i in range(40)]
    smooth = choose_track(jitter, 40, cfg=TrackConfig(smooth=5))
    raw = choose_track(jitter, 40, cfg=TrackConfig(smooth=1))
    assert smooth.boxes[5:35, 0].std() < raw.boxes[5:35, 0].std() / 3


def test_crop_geometry_inside_and_at_the_border():
    frames = torch.arange(280 * 320 * 3).remainder(251).to(torch.uint8).reshape(1, 280, 320, 3)
    # A box whose 1.0-scale crop covers exactly 224 x 224 pixels: no resampling, the pixels themselves.
    side = 256.0
    box = torch.tensor([[40.0, 8.0, 40 + side, 8 + side]])
    crop = crop_faces(frames, box, scales=(1.0,), size=224, resize=256)[0, 0]
    x0, y0 = 40 + 16, 8 + 16
    expected = frames[0, y0:y0 + 224, x0:x0 + 224].permute(2, 0, 1).float() / 255
    assert (crop - expected).abs().max() <= 1e-6

    # Near the corner, the part of the square outside the frame is black.
    white = torch.full((2, 100, 100, 3), 255, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [30.0, 30.0, 70.0, 70.0]])
    crops = crop_faces(white, boxes, scales=(0.9, 1.5), size=64, resize=64)
    assert crops.shape == (2, 2, 3, 64, 64)
    assert crops[1].min() > 0.99                          # the centred face stays inside the frame
    outside = crops[0, 1, 0] < 0.01                       # 1.5 x 40 = 60 px square centred on (20, 20)
    assert abs(outside.float().mean().item() - (1 - (50 / 60) ** 2)) < 0.03
    assert outside[0, 0] and not outside[-1, -1]


def decoded_frames(format, colorspace=2, color_range=0, size=(322, 242), count=3):
    """Frames as a decoder gives them: smooth colour gradients with noise, in `format`, tagged."""
    import av
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        rgb = np.stack([x * 255 // width, y * 255 // height, (x + y + 40 * i) % 256], -1)
        rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=format)
        frame.colorspace, frame.color_range = colorspace, color_range
        frames.append(frame)
    return frames


@pytest.mark.parametrize("format, colorspace, color_range", [("yuv420p", 2, 0), ("yuv420p", 1, 1),
                                                             ("yuvj420p", 5, 2), ("yuv444p", 1, 1)])
def test_crops_of_decoded_frames_convert_only_their_region_as_swscale_would(format, colorspace, color_range):
    from data import region_rgb, to_rgb
    frames = decoded_frames(format, colorspace, color_range)
    size = (frames[0].width, frames[0].height)
    whole = to_rgb(frames, size)  # FFmpeg's swscale on the whole frame: the reference
    if format == "yuv420p":
        for x1, y1, x2, y2 in [(0, 0, 322, 242), (17, 9, 140, 101), (300, 200, 322, 242)]:
            region = region_rgb(frames[0], x1, y1, x2, y2)
            expected = whole[0, y1:y2, x1:x2].permute(2, 0, 1).float() / 255
            assert region.shape == expected.shape and (region - expected).abs().max() <= 3 / 255
    boxes = torch.tensor([[40.5, 30.2, 140.0, 150.7], [-20.0, -10.0, 60.0, 70.0], [250.0, 180.0, 330.0, 250.0]])
    for rotation in (0, 90, 180, 270):
        shown = to_rgb(frames, size, rotation)
        expected = crop_faces(shown, boxes, (0.9, 1.5), 32, 36)
        got = crop_decoded(frames, boxes, size, rotation, (0.9, 1.5), 32, 36)
        assert got.shape == expected.shape == (3, 2, 3, 32, 32)
        if format in ("yuv420p", "yuvj420p"):  # its own conversion: within swscale's rounding
            assert (got - expected).abs().max() <= 3 / 255 and (got - expected).abs().mean() <= 1 / 255
        else:  # other formats are converted whole by swscale
            assert torch.equal(got, expected)


def test_audio_step_timing_comes_from_the_convolutions(tiny_w2v):
    from data import audio_hop, audio_receptive_field, frame_audio_features
    assert (audio_hop(tiny_w2v), audio_receptive_field(tiny_w2v)) == (320, 400)  # 20 ms steps, 25 ms windows
    wave = torch.randn(2 * 16000, generator=torch.Generator().manual_seed(3))
    times = frame_times(50, 25.0)
    features = frame_audio_features(tiny_w2v, wave, times, num_layers=2)
    steps = audio_step_features(tiny_w2v, wave, num_layers=2)
    centres = (torch.arange(len(steps)) * 320 + 200) / 16000
    inside = (centres[None] - times[:, None]).abs() <= 0.5
    expected = (inside.float() @ steps) / inside.sum(1, keepdim=True)
    assert features.shape == (50, 64) and (features - expected).abs().max() <= 1e-5


def astronaut_video(path, frames=6, side=256):
    from PIL import Image
    from skimage.data import astronaut
    image = np.asarray(Image.fromarray(astronaut()).resize((side, side), Image.BILINEAR))
    write_video(path, np.stack([np.roll(image, 4 * i, axis=1) for i in range(frames)]), 25, None, 16000, "mp4")
    return path


def test_detection_cache_is_reused_and_rebuilt(tmp_path, detector, monkeypatch, capsys):
    video = astronaut_video(tmp_path / "astronaut.mp4")
    cache = tmp_path / "cache"
    calls = []
    detect = detector.detect
    monkeypatch.setattr(detector, "detect", lambda *args, **kwargs: calls.append(1) or detect(*args, **kwargs))

    first = detect_video(video, detector, cache_dir=cache, progress=False)
    assert first.counts.tolist() == [1] * 6 and len(calls) == 1
    again = detect_video(video, detector, cache_dir=cache, progress=False)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values()))

    detect_video(video, detector, DetectConfig(score_threshold=0.6), cache_dir=cache, progress=False)
    assert len(calls) == 2                                           # other settings
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    detect_video(video, detector, cache_dir=cache, progress=False)
    assert len(calls) == 3                                           # the video changed
    (cache / "astronaut.mp4.faces.safetensors").write_bytes(b"not a cache")
    rebuilt = detect_video(video, detector, cache_dir=cache, progress=False)
    assert len(calls) == 4 and "unreadable" in capsys.readouterr().err
    assert torch.equal(rebuilt.boxes, first.boxes)


def test_track_and_crop_a_video(tmp_path, detector):
    video = astronaut_video(tmp_path / "astronaut.mp4")
    track, times = track_video(video, detector, progress=False)
    assert track.detected.all() and torch.allclose(times, torch.arange(6, dtype=torch.float64) / 25, atol=1e-3)
    boxes = track.boxes.clone()
    boxes[2] = float("nan")
    indices, crops = zip(*iter_face_crops(video, boxes, batch_size=4))
    assert torch.cat(indices).tolist() == [0, 1, 3, 4, 5]
    assert torch.cat(crops).shape == (5, 3, 3, 224, 224)


def test_final_boxes_equal_the_whole_video_ones():
    # What the one-pass pipeline crops: each frame's box from the detections within track_lag frames of it
    # only, equal to fill_and_smooth over the whole video, for tracks with gaps short and long.
    from data import fill_and_smooth, final_boxes, track_lag
    rng = np.random.default_rng(0)
    for cfg in (TrackConfig(), TrackConfig(fill_gap=3, smooth=1), TrackConfig(fill_gap=0, smooth=7)):
        for _ in range(5):
            n = 300
            seen = np.flatnonzero(np.repeat(rng.random(n // 10) < 0.7, 10) & (rng.random(n) < 0.8))
            track = {int(f): (torch.tensor([f * 0.5, 20.0, f * 0.5 + 40 + f % 7, 70.0]), 0.9) for f in seen}
            whole = fill_and_smooth(track, n, cfg).boxes
            for first in range(0, n, 37):
                last = min(first + 37, n)
                window = final_boxes(track, first, last, cfg)
                assert torch.equal(window.isnan(), whole[first:last].isnan())
                assert torch.allclose(window.nan_to_num(), whole[first:last].nan_to_num(), atol=1e-4)
    assert track_lag(TrackConfig()) == 12 + 1 + 2


def test_small_crops_of_a_large_face_stay_close_to_the_direct_roi_align():
    # crop_faces averages k x k blocks before roi_align when a crop spans many pixels per output pixel
    from PIL import Image
    from skimage.data import astronaut
    from torchvision.ops import roi_align
    frame = torch.from_numpy(np.array(Image.fromarray(astronaut()).resize((1280, 1280))))[None, :720].contiguous()
    box = torch.tensor([[400.0, 100.0, 976.0, 676.0]])
    for size, resize, bound in ((42, 48, 0.06), (224, 256, 1e-5)):
        half = 576 * torch.tensor([0.9, 1.2, 1.5]) * size / resize / 2
        rois = torch.stack([torch.zeros(3), 688 - half, 388 - half, 688 + half, 388 + half], 1)
        direct = roi_align(frame.permute(0, 3, 1, 2).float() / 255, rois, size, 1.0, 0, True)
        diff = (crop_faces(frame, box, size=size, resize=resize)[0] - direct).abs()
        assert diff.max() <= bound and diff.mean() <= bound / 10
