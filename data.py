"""Video and audio decoding, face tracks and crops, frame-aligned audio features, Stage II per-frame
features (video_features, extract_features), and Stage I's image datasets.

    python data.py probe VIDEO              # fps, frame count, size, rotation, audio: as JSON

Decoding streams through PyAV, so memory stays bounded whatever the video's length and size:
`iter_frames` yields batches of RGB frames (display rotation applied) with their true
presentation times, and `AudioReader` the mono 16 kHz sound, each piece at its presentation time
on the same clock; `frame_audio` turns it into per-frame wav2vec 2.0 features as it streams.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import collections
import contextlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_iou, roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from tqdm import tqdm

from models import (CLASSES, IGNORE_LABEL, EmoError, Faces, atomic_path, autocast, first_line, load_encoder,
                    Wav2Vec2, normalize_waveform, read_json, run, save_safetensors, torchrun_process)

SAMPLE_RATE = 16000  # what wav2vec 2.0 expects
ABAW_HEADER = ",".join(CLASSES)

# ------------------------------------------------------------------------------------ decoding


@dataclass
class VideoInfo:
    path: str
    fps: float             # the stream's average frame rate
    frames: int            # exact when the container records it, else duration * fps
    frames_exact: bool
    duration: float        # seconds
    width: int             # as displayed, after rotation
    height: int
    rotation: int          # degrees counter-clockwise to display the coded picture: 0, 90, 180, 270
    has_audio: bool
    start: float = 0.0     # presentation time of the first frame, seconds (the file's clock, as frames' times)


def _warn(text):
    """One warning line on stderr that keeps the progress bar intact."""
    tqdm.write(f"warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def _opened(path):
    """A media file open with PyAV (see _open): an FFmpeg error while reading it becomes one EmoError line."""
    container = _open(path)
    try:
        yield container
    except av.FFmpegError as e:
        raise _undecodable(path, first_line(e)) from None
    finally:
        container.close()


def _open(path):
    """Open a media file with PyAV, turning every way it can fail into one EmoError line."""
    path = Path(path)
    if not path.is_file():
        raise EmoError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise EmoError(f"{path} is not a readable video ({first_line(e)}); "
                       "check that the file is complete, or re-encode it (e.g. to H.264 .mp4)") from None


def _undecodable(path, reason):
    return EmoError(f"{path} cannot be decoded ({reason}); the file may be damaged, re-encode or download it again")


def _video_stream(container, path):
    if not container.streams.video:
        container.close()
        raise EmoError(f"{path} has no video stream (audio only?); pass a video file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _rotation(frame, stream):
    """The frame's display rotation, counter-clockwise, snapped to 0/90/180/270.

    It comes from the display matrix; old files that only carry a `rotate` tag (clockwise
    degrees) are read from the tag.
    """
    degrees = frame.rotation or 0
    if not degrees:
        try:
            degrees = -float(stream.metadata.get("rotate", 0))
        except ValueError:
            degrees = 0
    return int(round(degrees / 90.0)) % 4 * 90


def probe(path):
    """VideoInfo of a video file. Decodes one frame, to read the rotation and check the codec."""
    with _opened(path) as container:
        stream = _video_stream(container, path)
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        frames_exact = bool(stream.frames)
        frames = int(stream.frames) if frames_exact else int(round(duration * fps))
        first = next(container.decode(stream), None)
        if first is None:
            raise EmoError(f"{path} has a video stream without any decodable frame; re-encode it")
        rotation = _rotation(first, stream)
        start = float(first.time) if first.time is not None else 0.0
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        return VideoInfo(path=str(path), fps=fps, frames=frames, frames_exact=frames_exact,
                         duration=duration, width=width, height=height, rotation=rotation,
                         has_audio=bool(container.streams.audio), start=start)


MAX_BATCH_BYTES = 64 << 20  # decoded RGB held per batch: a few 4K frames, many small ones


def iter_decoded(path, batch_size=64):
    """Yield (frames, times, size, rotation): decoded av.VideoFrames (not yet converted to RGB) in
    presentation order, batch_size at a time but never more than MAX_BATCH_BYTES as RGB, their times
    (float64 seconds), the first frame's coded (width, height) and its display rotation. For passes that
    convert only the frames they need, at the size they need (to_rgb)."""
    if batch_size < 1:
        raise EmoError(f"batch_size must be at least 1, got {batch_size}")
    with _opened(path) as container:
        stream = _video_stream(container, path)
        fps = float(stream.average_rate or 25)
        size = None
        decoded, times, rotation = [], [], 0
        for index, frame in enumerate(_decode(container, stream, path)):
            if size is None:
                size, rotation = (frame.width, frame.height), _rotation(frame, stream)
                batch_size = max(1, min(batch_size, MAX_BATCH_BYTES // (3 * size[0] * size[1])))
            decoded.append(frame)
            # frames without a timestamp (some broken AVIs) fall back to their index / fps
            times.append(float(frame.time) if frame.time is not None else index / fps)
            if len(decoded) == batch_size:
                yield decoded, torch.tensor(times, dtype=torch.float64), size, rotation
                decoded, times = [], []
        if decoded:
            yield decoded, torch.tensor(times, dtype=torch.float64), size, rotation


def iter_frames(path, batch_size=64):
    """Yield (frames, times): uint8 (B, H, W, 3) RGB as displayed, float64 (B,) seconds.

    Frames come in presentation order, batch_size at a time but never more than MAX_BATCH_BYTES of
    RGB, so memory stays bounded in both the video's length and its frame size. Times are the frames'
    own presentation timestamps (true times for variable-frame-rate video), as the container stores
    them (usually starting at 0). A frame whose size differs from the first frame's (rare mid-stream
    changes) is scaled to the first frame's size.
    """
    for frames, times, size, rotation in iter_decoded(path, batch_size):
        yield to_rgb(frames, size, rotation), times


def display_size(size, rotation):
    """(width, height) as displayed of a coded (width, height)."""
    return (size[1], size[0]) if rotation in (90, 270) else tuple(size)


def _decode(container, stream, path):
    """The frames of a stream, decoded packet by packet: a damaged packet costs only its own frames (one
    warning at the end says how many packets were lost). Nothing decodable at all: one EmoError line."""
    damaged, decoded, reason = 0, 0, None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            damaged, reason = damaged + 1, reason or first_line(e)
            continue
        decoded += len(frames)
        yield from frames
    if damaged and not decoded:
        raise _undecodable(path, reason)
    if damaged:
        _warn(f"{path}: {damaged} damaged video packet(s) could not be decoded; their frames are missing")


_converters = None


def to_rgb(frames, size, rotation=0):
    """Decoded frames as uint8 (B, H, W, 3) RGB as displayed: converted (and scaled, in the same swscale
    call) to the coded `size` (width, height), then rotated. The colour conversion costs about as much
    as the decoding; PyAV releases the GIL in it, so a few threads convert a batch side by side."""
    global _converters
    if _converters is None:
        _converters = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 1))), thread_name_prefix="emo-rgb")
    images = np.empty((len(frames), size[1], size[0], 3), np.uint8)  # filled in place: no second copy

    def convert(i):
        images[i] = frames[i].to_ndarray(width=size[0], height=size[1], format="rgb24")
    list(_converters.map(convert, range(len(frames))))
    images = torch.from_numpy(images)
    if rotation:
        images = torch.rot90(images, rotation // 90, dims=(1, 2)).contiguous()
    return images


def frame_presentation_times(path):
    """(N,) float64 seconds: the times iter_frames gives, from one decoding pass without colour conversion."""
    with _opened(path) as container:
        stream = _video_stream(container, path)
        fps = float(stream.average_rate or 25)
        times = [float(frame.time) if frame.time is not None else index / fps
                 for index, frame in enumerate(_decode(container, stream, path))]
    return torch.tensor(times, dtype=torch.float64)


class AudioReader:
    """The first audio track of a file, streamed as one contiguous mono float32 wave at sample_rate.

        reader = AudioReader("clip.mp4")
        for block in reader:      # numpy float32 pieces, in order; together the whole wave
            ...
        reader.start              # seconds on the file's clock of the wave's first sample

    Packets are decoded one at a time, mixed to mono and resampled by FFmpeg's libswresample, and every
    piece is placed at its own presentation time: an audio stream that starts before or after the video,
    or has a gap in the middle, keeps its sound where it plays. Gaps become silence in the wave and are
    listed in `gaps` as (start, end) seconds; overlaps are dropped. A packet that does not decode costs
    only its own samples (a gap, counted in `lost_seconds`). A file that cannot be opened or demuxed
    raises one EmoError line. has_audio is False for a file without an audio stream (no blocks).
    """

    def __init__(self, path, sample_rate=SAMPLE_RATE):
        self.path, self.sample_rate = Path(path), sample_rate
        self.start, self.samples, self.gaps, self.lost_seconds = None, 0, [], 0.0
        self.has_audio = None

    @property
    def end(self):
        """Seconds on the file's clock just after the last sample read so far."""
        return None if self.start is None else self.start + self.samples / self.sample_rate

    def __iter__(self):
        container = _open(self.path)
        try:
            self.has_audio = bool(container.streams.audio)
            if not self.has_audio:
                return
            stream = container.streams.audio[0]
            mono = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:  # a damaged packet: lose its samples, keep going
                    if packet.duration and packet.time_base:
                        self.lost_seconds += float(packet.duration * packet.time_base)
                    continue
                for frame in frames:
                    yield from self._place(mono.resample(frame))
            yield from self._place(mono.resample(None))
        except av.FFmpegError as e:
            raise EmoError(f"{self.path}: the audio track cannot be read ({first_line(e)}); "
                           "re-encode the file or download it again") from None
        finally:
            container.close()

    def _place(self, frames):
        tolerance = 2  # samples: timestamps are rounded to the stream's time base
        for frame in frames:
            piece = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if self.start is None:
                self.start = float(frame.time) if frame.time is not None else 0.0
            if frame.time is not None:
                offset = round((float(frame.time) - self.start) * self.sample_rate) - self.samples
                if offset > tolerance:  # a gap: silence until this piece
                    self.gaps.append((self.end, self.end + offset / self.sample_rate))
                    self.samples += offset
                    yield np.zeros(offset, np.float32)
                elif offset < -tolerance:  # overlaps what was placed already: keep the first
                    piece = piece[-offset:]
            self.samples += len(piece)
            if len(piece):
                yield piece

    def covered(self, times):
        """(N,) bool: which of `times` (seconds, the file's clock) fall on decoded sound."""
        times = torch.as_tensor(times, dtype=torch.float64)
        if self.start is None:
            return torch.zeros(len(times), dtype=torch.bool)
        inside = (times >= self.start) & (times < self.end)
        for begin, end in self.gaps:
            inside &= ~((times >= begin) & (times < end))
        return inside


def read_audio(path, sample_rate=SAMPLE_RATE):
    """(wave, has_audio): the whole first audio track as float32 mono (samples,) at sample_rate, placed as
    AudioReader places it (starting at its own first sample; see AudioReader.start). For short files and
    tests: the pipeline streams the track instead."""
    reader = AudioReader(path, sample_rate)
    blocks = list(reader)
    wave = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.zeros(0, dtype=torch.float32)
    return wave, bool(reader.has_audio)


# ------------------------------------------------------------------------------- writing video

def yuv420p_frame(rgb):
    """An (H, W, 3) uint8 RGB image (even H, W) as a yuv420p VideoFrame: BT.601 limited range, chroma the
    mean of each 2x2 block, every byte of the planes written, line padding included.

    Converting here instead of in FFmpeg keeps the synthetic videos identical on every machine: with
    PyAV 18's FFmpeg, rgb24 -> yuv420p in swscale gave different pixels from run to run on AVX-512 CPUs
    (the same seed, the same process), while x264 itself is deterministic at one thread.
    """
    height, width, _ = rgb.shape
    if height % 2 or width % 2:
        raise EmoError(f"synthetic video frames need an even size, got {width}x{height}")
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    y = (66 * r + 129 * g + 25 * b + 128 >> 8) + 16
    u = (-38 * r - 74 * g + 112 * b + 128 >> 8) + 128
    v = (112 * r - 94 * g - 18 * b + 128 >> 8) + 128
    u, v = ((c.reshape(height // 2, 2, width // 2, 2).sum((1, 3)) + 2) // 4 for c in (u, v))
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, values in zip(frame.planes, (y, u, v)):
        rows = np.zeros((plane.buffer_size // plane.line_size, plane.line_size), np.uint8)
        rows[:values.shape[0], :values.shape[1]] = np.clip(values, 0, 255)
        plane.update(rows)
    return frame


def write_video(path, frames, fps, audio, sample_rate, container_format):
    """Encode frames (and mono audio, if given) with PyAV: H.264 + AAC in .mp4, MPEG-4 + PCM in .avi."""
    n, H, W, _ = frames.shape
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format=container_format) as out:
        if container_format == "mp4":
            video = out.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast"})
        else:
            video = out.add_stream("mpeg4", rate=fps)
            video.bit_rate = 1_500_000
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.codec_context.thread_count = 1  # deterministic output
        sound = None
        if audio is not None:
            if container_format == "mp4":
                sound = out.add_stream("aac", rate=sample_rate, layout="stereo")
            else:
                sound = out.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
        for i in range(n):
            frame = yuv420p_frame(frames[i])
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            chunk = 1024
            for start in range(0, len(audio), chunk):
                piece = audio[start:start + chunk]
                if container_format == "mp4":  # stereo, so read_audio has channels to mix
                    array = np.stack([piece, piece]).astype(np.float32)
                    frame = av.AudioFrame.from_ndarray(array, format="fltp", layout="stereo")
                else:
                    array = (np.clip(piece, -1, 1) * 32767).astype(np.int16)[None]
                    frame = av.AudioFrame.from_ndarray(array, format="s16", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)


# --------------------------------------------------------------------------- faces: detection

@dataclass
class DetectConfig:
    score_threshold: float = 0.5  # face probability a candidate needs
    min_size: int = 30            # smallest box side, in frame pixels
    nms_iou: float = 0.4
    max_side: int = 640           # frames are scaled down to this longer side for the detector
    every: int = 1                # look at every this-many-th frame; the tracker fills the boxes between
    batch_size: int = 32          # frames per detector forward


@dataclass
class VideoFaces:
    """Every detection in a video, flat: frame f owns rows offsets[f]:offsets[f + 1]."""
    times: torch.Tensor      # (frames,) presentation times, seconds
    counts: torch.Tensor     # (frames,) faces found on each frame
    boxes: torch.Tensor      # (faces, 4) x1, y1, x2, y2 in frame pixels
    scores: torch.Tensor     # (faces,)

    def per_frame(self):
        """[(boxes (K, 4), scores (K,))] per frame, as the tracker takes them."""
        counts = self.counts.tolist()
        return list(zip(self.boxes.split(counts), self.scores.split(counts)))


def detector_size(width, height, cfg=DetectConfig()):
    """(width, height) the detector sees a width x height frame at: the longer side at most cfg.max_side."""
    scale = min(1.0, cfg.max_side / max(width, height))
    return (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1.0 else (width, height)


def detect_frames(detector, frames, cfg=DetectConfig(), scale=1.0):
    """Faces in a batch of uint8 RGB frames (B, H, W, 3), boxes in the video's pixels, the frames being the
    video's scaled by `scale`. Frames still larger than cfg.max_side are scaled down here (antialiased, on
    the detector's device)."""
    frames = frames.to(next(detector.parameters()).device)
    height, width = frames.shape[1:3]
    size = detector_size(width, height, cfg)
    if size[0] < width:
        frames = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=size[::-1], mode="bilinear", antialias=True)
        frames = frames.round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, h, w): detect takes either layout
        scale *= size[0] / width
    faces = detector.detect(frames, cfg.score_threshold, cfg.nms_iou, cfg.min_size * scale)
    if scale != 1.0:
        for face in faces:
            face.boxes, face.landmarks = face.boxes / scale, face.landmarks / scale
    return faces


def detect_decoded(detector, frames, size, rotation, cfg=DetectConfig(), first=0):
    """Faces in decoded frames (iter_decoded's, the video's first, first + 1, ...), boxes in the video's
    pixels. Only frames whose index is a multiple of cfg.every are looked at (the others get no faces),
    each converted straight to the detector's size in its colour conversion."""
    width, height = display_size(size, rotation)
    small = detector_size(width, height, cfg)
    looked = [i for i in range(len(frames)) if (first + i) % cfg.every == 0]
    found = detect_frames(detector, to_rgb([frames[i] for i in looked], display_size(small, rotation), rotation),
                          cfg, small[0] / width) if looked else []
    faces = [Faces(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)) for _ in frames]
    for i, face in zip(looked, found):
        faces[i] = face
    return faces


def detect_video(path, detector, cfg=DetectConfig(), cache_dir=None, progress=True):
    """VideoFaces of a whole video, decoded and detected batch by batch.

    With cache_dir the result is kept in <cache_dir>/<video name>.faces.safetensors and reused
    while the video file (path, size, modification time), the detector's weights and cfg stay the
    same; anything else rebuilds it. A damaged cache file is reported and rebuilt.
    """
    cache, key = _faces_cache(path, detector, cfg, cache_dir)
    if cache is not None and cache.exists():
        cached = _read_faces_cache(cache, key)
        if cached is not None:
            return cached
    times, counts, boxes, scores = [], [], [], []
    with tqdm(total=probe(path).frames, desc=f"faces {Path(path).name}", unit="frame", disable=not progress) as bar:
        for frames, frame_times, size, rotation in _prefetch(iter_decoded(path, cfg.batch_size)):
            for face in detect_decoded(detector, frames, size, rotation, cfg, first=len(counts)):
                counts.append(len(face.scores))
                boxes.append(face.boxes.cpu())
                scores.append(face.scores.cpu())
            times.append(frame_times)
            bar.update(len(frames))
    faces = video_faces(times, counts, boxes, scores)
    if cache is not None:
        _write_faces_cache(cache, key, faces)
    return faces


def video_faces(times, counts, boxes, scores):
    """VideoFaces from per-batch times and per-frame counts, boxes and scores."""
    return VideoFaces(times=torch.cat(times) if times else torch.zeros(0, dtype=torch.float64),
                      counts=torch.tensor(counts, dtype=torch.long),
                      boxes=torch.cat(boxes) if boxes else torch.zeros(0, 4),
                      scores=torch.cat(scores) if scores else torch.zeros(0))


FACES_FORMAT = "emo-faces/2"  # a face cache of another format (/1 held landmarks) is silently rebuilt


def _faces_cache(path, detector, cfg, cache_dir):
    """(cache file or None, key): where a video's detections are cached and what they were made from."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    key = json.dumps({"format": FACES_FORMAT, "video": str(path.resolve()), "size": stat and stat.st_size,
                      "mtime_ns": stat and stat.st_mtime_ns, "detector": weights_fingerprint(detector),
                      "settings": asdict(cfg)}, sort_keys=True)
    return (Path(cache_dir) / f"{path.name}.faces.safetensors" if cache_dir else None), key


def _write_faces_cache(cache, key, faces):
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(cache, asdict(faces), {"key": key})


def _read_faces_cache(cache, key):
    """The cached VideoFaces if the cache file is intact and was made for this key, else None."""
    from safetensors import safe_open
    try:
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return VideoFaces(**{name: f.get_tensor(name) for name in f.keys()})
    except Exception as e:  # damaged or foreign file: say so, then detect again
        _warn(f"face cache {cache} is unreadable ({first_line(e)}); detecting again")
        return None


def weights_fingerprint(module):
    """A short hash of a module's weights, so caches notice a different detector."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- faces: tracking

@dataclass
class TrackConfig:
    iou_match: float = 0.3      # a detection continues a track when it overlaps the track's last box this much
    max_gap: int = 75           # frames a person may go undetected and still be the same track
    fill_gap: int = 12          # gaps up to this many frames take the nearest detection's box
    smooth: int = 5             # frames in the moving average over box centres and sizes (1: none)
    min_track_fraction: float = 0.1  # tracks on fewer frames than this are not candidates for the target


@dataclass
class FaceTrack:
    """One person's face box on every frame of a video."""
    boxes: torch.Tensor     # (frames, 4) x1, y1, x2, y2 in frame pixels; NaN where no face is known
    detected: torch.Tensor  # (frames,) bool: a detection of this person on this very frame


class Tracker:
    """Chains per-frame detections into tracks, one frame at a time, by greedy IoU matching with each
    live track's box: its last one, or that box moved on at the speed between its last two detections,
    whichever overlaps more (a face moving fast between detections that are frames apart stays one track).
    tracks: one dict frame index -> (box, score) per track."""

    def __init__(self, cfg=TrackConfig()):
        self.cfg, self.tracks, self.last_seen, self.seen_before = cfg, [], [], []

    def _expected(self, alive, frame):
        """(last boxes (T, 4), the same moved on to `frame` (T, 4)) of the live tracks."""
        last = torch.stack([self.tracks[t][self.last_seen[t]][0] for t in alive])
        before = torch.stack([self.tracks[t][self.seen_before[t]][0] for t in alive])
        frames = torch.tensor([[self.last_seen[t], self.seen_before[t]] for t in alive], dtype=last.dtype)
        speed = (last - before) / (frames[:, :1] - frames[:, 1:]).clamp_min(1)  # 0 for a single detection
        return last, last + speed * (frame - frames[:, :1])

    def update(self, frame, boxes, scores):
        """Add frame `frame`'s detections: boxes (K, 4), scores (K,)."""
        alive = [t for t in range(len(self.tracks)) if frame - self.last_seen[t] <= self.cfg.max_gap + 1]
        unmatched = set(range(len(boxes)))
        if alive and len(boxes):
            last, moved = self._expected(alive, frame)
            overlap = torch.maximum(box_iou(last, boxes), box_iou(moved, boxes))
            for flat in overlap.flatten().argsort(descending=True).tolist():
                row, col = divmod(flat, len(boxes))
                if overlap[row, col] < self.cfg.iou_match:
                    break
                t = alive[row]
                if col in unmatched and self.last_seen[t] != frame:
                    self.tracks[t][frame] = (boxes[col], float(scores[col]))
                    self.seen_before[t], self.last_seen[t] = self.last_seen[t], frame
                    unmatched.discard(col)
        for col in sorted(unmatched):
            self.tracks.append({frame: (boxes[col], float(scores[col]))})
            self.last_seen.append(frame)
            self.seen_before.append(frame)


def link_tracks(detections, cfg=TrackConfig()):
    """The Tracker's tracks over detections: one (boxes (K, 4), scores (K,)) pair per frame."""
    tracker = Tracker(cfg)
    for frame, (boxes, scores) in enumerate(detections):
        tracker.update(frame, boxes, scores)
    return tracker.tracks


def pick_track(tracks, num_frames, rule="largest", cfg=TrackConfig()):
    """The target person's track (one of `tracks`, as link_tracks gives them) or None when there is none.
    num_frames: the frames the detector looked at.
    rule: "largest" (biggest face over the video), "left" or "right" (among the two most present people,
    the one further left/right, as in ABAW's <video>_left / <video>_right annotation ids). Tracks on
    fewer than min_track_fraction of the frames are no candidates."""
    if rule not in PEOPLE:
        raise EmoError(f"unknown person rule {rule!r}: use largest, left or right")
    tracks = [t for t in tracks if len(t) >= cfg.min_track_fraction * num_frames]
    if not tracks:
        return None
    if rule == "largest":
        return max(tracks, key=lambda t: sum(float((b[2] - b[0]) * (b[3] - b[1])) for b, _ in t.values()))
    pair = sorted(tracks, key=len, reverse=True)[:2]
    centre_x = [sum(float(b[0] + b[2]) / 2 for b, _ in t.values()) / len(t) for t in pair]
    return pair[centre_x.index(min(centre_x) if rule == "left" else max(centre_x))]


def choose_track(detections, num_frames, rule="largest", cfg=TrackConfig(), every=1):
    """The target person's FaceTrack (see pick_track), filled and smoothed; None when no face was found.
    every: the detector looked at every this-many-th frame."""
    target = pick_track(link_tracks(detections, cfg), len(range(0, num_frames, every)), rule, cfg)
    return None if target is None else fill_and_smooth(target, num_frames, cfg)


def track_lag(cfg=TrackConfig()):
    """Frames after which a frame's filled and smoothed box is final: a gap is filled once the detection
    that closes it (at most fill_gap frames on) is known, and smoothing reaches smooth // 2 frames further."""
    return cfg.fill_gap + 1 + cfg.smooth // 2


def final_boxes(track, first, last, cfg=TrackConfig()):
    """fill_and_smooth's boxes of frames first..last-1 of a track, computed from the detections within
    track_lag frames of them only: the same boxes as over the whole video, once those detections are in."""
    lag = track_lag(cfg)
    lo, hi = max(0, first - lag), last + lag
    window = {f - lo: value for f, value in track.items() if lo <= f < hi}
    return fill_and_smooth(window, hi - lo, cfg).boxes[first - lo:last - lo]


def fill_and_smooth(track, num_frames, cfg=TrackConfig()):
    """Boxes on every frame the track covers: a gap of up to fill_gap frames between two detections takes
    the box interpolated between them; longer gaps, and frames before the first or after the last
    detection, stay unknown (NaN). Then centres and sizes get a moving average within each run of
    known boxes."""
    detected = torch.zeros(num_frames, dtype=torch.bool)
    boxes = torch.full((num_frames, 4), float("nan"))
    for frame, (box, score) in track.items():
        detected[frame], boxes[frame] = True, box
    seen = torch.nonzero(detected).flatten()
    if len(seen) > 1:
        gap = seen.diff() - 1
        for a, b in zip(seen[:-1][(gap > 0) & (gap <= cfg.fill_gap)].tolist(),
                        seen[1:][(gap > 0) & (gap <= cfg.fill_gap)].tolist()):
            weight = (torch.arange(a + 1, b) - a).float()[:, None] / (b - a)
            boxes[a + 1:b] = torch.lerp(boxes[a], boxes[b], weight)
    if cfg.smooth > 1:
        centre_size = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
        known = ~centre_size[:, 0].isnan()
        weights = F.avg_pool1d(known.float()[None], cfg.smooth, 1, cfg.smooth // 2, count_include_pad=True)
        sums = F.avg_pool1d(centre_size.nan_to_num().T, cfg.smooth, 1, cfg.smooth // 2, count_include_pad=True)
        centre_size = torch.where(known[:, None], (sums / weights.clamp_min(1e-12)).T, float("nan"))
        centre, size = centre_size[:, :2], centre_size[:, 2:]
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    return FaceTrack(boxes=boxes, detected=detected)


# ------------------------------------------------------------------------- faces: multi-scale crops

def _crop_geometry(boxes, scales, size, resize, width, height):
    """The crops' squares (B, S, 4) and, per frame, [x1, y1, x2, y2, k]: the region they cover (plus a
    2-pixel margin, so that bilinear sampling sees the same neighbours as on the whole frame) and the block
    size k to average it over first (as large as keeps at least 4 frame pixels per output pixel)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1)
    half = side[:, None] * torch.tensor(scales, dtype=side.dtype, device=side.device)[None] * (size / resize) / 2
    corners = torch.cat([(centre[:, None] - half[..., None]), (centre[:, None] + half[..., None])], 2)
    low = (corners[..., :2].amin(1).floor() - 2).clamp_min(0)
    high = torch.minimum(corners[..., 2:].amax(1).ceil() + 3, torch.tensor([width, height], device=corners.device))
    smallest = (2 * half.amin(1) / (4 * size)).floor().clamp_min(1)
    return corners, torch.cat([low, high, smallest[:, None]], 1).int().tolist()  # one transfer for the batch


def _crop_region(region, rois, x1, y1, k, size):
    """roi_align of one frame's crops `rois` (S, 4, frame pixels) from its region: float (3, h, w) in 0..1
    whose top-left pixel is (x1, y1); None for an empty region (every crop outside the frame: zeros)."""
    if region is None:
        return torch.zeros(len(rois), 3, size, size, device=rois.device)
    region = region[None]
    if k > 1:  # averages k x k blocks as roi_align's own sampling would, at a fraction of the cost
        region = F.avg_pool2d(region, k, ceil_mode=True)
    shifted = rois - torch.tensor([x1, y1, x1, y1], dtype=rois.dtype, device=rois.device)
    indexed = torch.cat([torch.zeros(len(rois), 1, dtype=rois.dtype, device=rois.device), shifted], 1)
    return roi_align(region, indexed, output_size=size, spatial_scale=1 / k, sampling_ratio=0, aligned=True)


def crop_faces(frames, boxes, scales=(0.9, 1.2, 1.5), size=224, resize=256):
    """Square face crops at several scales, for a batch of frames.

    frames: (B, H, W, 3) uint8 RGB; boxes: (B, 4) x1, y1, x2, y2. Each crop is a square of side
    max(w, h) * scale around the box centre, zero outside the frame, resized to `resize` and
    centre-cropped to `size` (the encoder's eval transform), i.e. the middle size/resize of it.
    Only the region the crops cover is turned into floats, one roi_align call per frame. Where a crop
    spans many frame pixels per output pixel, the region is first averaged over k x k blocks: on a 576 px
    face cropped to 42 px, within 0.0044 (1/255) of the direct crop at the 99th percentile, 0.05 at most;
    a 224 px crop of it is unchanged.
    Returns (B, len(scales), 3, size, size) float in 0..1.
    """
    boxes = boxes.to(frames.device)
    corners, regions = _crop_geometry(boxes, scales, size, resize, frames.shape[2], frames.shape[1])
    crops = [_crop_region(frame[y1:y2, x1:x2].permute(2, 0, 1).float().div_(255) if x2 > x1 and y2 > y1 else None,
                          rois, x1, y1, k, size) for frame, rois, (x1, y1, x2, y2, k) in zip(frames, corners, regions)]
    return torch.stack(crops) if crops else torch.zeros(0, len(scales), 3, size, size, device=frames.device)


# Kr, Kb of the YUV -> RGB matrix swscale takes for a frame's colorspace tag (FFmpeg's AVColorSpace:
# 1 BT.709, 4 FCC, 7 SMPTE 240M, 9/10 BT.2020); every other tag, unspecified included, is BT.601.
YUV_WEIGHTS = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def region_rgb(frame, x1, y1, x2, y2):
    """float (3, y2 - y1, x2 - x1) RGB in 0..1 of a region of a decoded 8-bit 4:2:0 planar frame (yuv420p,
    yuvj420p; coded pixels), converted here as swscale converts the whole frame (the frame's colorspace and
    range, each chroma sample repeated over its 2 x 2 pixels: within 3/255 of it) without touching the rest."""
    planes = [np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size) for plane in frame.planes]
    luma = torch.from_numpy(planes[0][y1:y2, x1:x2]).float()
    rows, cols = slice(y1 // 2, (y2 + 1) // 2), slice(x1 // 2, (x2 + 1) // 2)
    chroma = torch.from_numpy(np.stack([planes[1][rows, cols], planes[2][rows, cols]])).float()
    chroma = chroma.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, y1 % 2:y1 % 2 + y2 - y1, x1 % 2:x1 % 2 + x2 - x1]
    if frame.format.name == "yuvj420p" or frame.color_range == 2:  # full range (JPEG)
        luma, chroma = luma / 255, (chroma - 128) / 255
    else:
        luma, chroma = (luma - 16) / 219, (chroma - 128) / 224
    kr, kb = YUV_WEIGHTS.get(frame.colorspace, (0.299, 0.114))
    red = luma + 2 * (1 - kr) * chroma[1]
    blue = luma + 2 * (1 - kb) * chroma[0]
    green = (luma - kr * red - kb * blue) / (1 - kr - kb)
    return torch.stack([red, green, blue]).clamp_(0, 1)


def _coded_region(x1, y1, x2, y2, size, rotation):
    """The coded-pixel rectangle that shows as the displayed one after to_rgb's rotation."""
    width, height = size
    return {0: (x1, y1, x2, y2), 90: (width - y2, x1, width - y1, x2), 180: (width - x2, height - y2, width - x1,
            height - y1), 270: (y1, height - x2, y2, height - x1)}[rotation]


def crop_decoded(frames, boxes, size, rotation, scales=(0.9, 1.2, 1.5), crop_size=224, resize=256):
    """crop_faces of decoded frames (iter_decoded's, coded `size`, display `rotation`): for 8-bit 4:2:0
    frames of the stream's size only the crops' regions are converted to RGB (region_rgb); other frames
    are converted whole (to_rgb). boxes: (B, 4) in displayed pixels. Returns (B, S, 3, crop_size, crop_size)."""
    width, height = display_size(size, rotation)
    corners, regions = _crop_geometry(boxes, scales, crop_size, resize, width, height)
    direct = [f.format.name in ("yuv420p", "yuvj420p") and (f.width, f.height) == tuple(size) for f in frames]
    whole = iter(to_rgb([f for f, d in zip(frames, direct) if not d], size, rotation)) if not all(direct) else None
    crops = []
    for frame, fast, rois, (x1, y1, x2, y2, k) in zip(frames, direct, corners, regions):
        region = None
        if fast and x2 > x1 and y2 > y1:
            region = torch.rot90(region_rgb(frame, *_coded_region(x1, y1, x2, y2, size, rotation)), rotation // 90,
                                 dims=(1, 2))
        elif not fast:
            image = next(whole)
            region = image[y1:y2, x1:x2].permute(2, 0, 1).float().div_(255) if x2 > x1 and y2 > y1 else None
        crops.append(_crop_region(region, rois, x1, y1, k, crop_size))
    return torch.stack(crops) if crops else torch.zeros(0, len(scales), 3, crop_size, crop_size)


def iter_face_crops(path, boxes, scales=(0.9, 1.2, 1.5), size=224, resize=256, batch_size=32):
    """Yield (frame indices, crops (B, len(scales), 3, size, size)) for the frames of a video that
    have a box; boxes: (frames, 4) with NaN rows where the face is unknown (a FaceTrack's)."""
    start = 0
    for frames, _ in iter_frames(path, batch_size):
        index = torch.arange(start, start + len(frames))
        start += len(frames)
        index = index[index < len(boxes)]
        known = index[~boxes[index].isnan().any(1)]
        if len(known):
            yield known, crop_faces(frames[known - index[0]], boxes[known], scales, size, resize)


def track_video(path, detector, rule="largest", detect_cfg=DetectConfig(), track_cfg=TrackConfig(),
                cache_dir=None, progress=True):
    """(FaceTrack of the target person or None, frame times): detect (cached), link, choose, fill, smooth."""
    faces = detect_video(path, detector, detect_cfg, cache_dir, progress)
    return choose_track(faces.per_frame(), len(faces.counts), rule, track_cfg, detect_cfg.every), faces.times


# ------------------------------------------------------------------------------- audio features

def audio_hop(w2v):
    return math.prod(w2v.cfg.conv_stride)


def audio_receptive_field(w2v):
    reach, jump = 1, 1
    for kernel, stride in zip(w2v.cfg.conv_kernel, w2v.cfg.conv_stride):
        reach, jump = reach + (kernel - 1) * jump, jump * stride
    return reach


@torch.inference_mode()
def iter_step_features(w2v, blocks, num_layers=4, chunk_seconds=20.0, context_seconds=2.0):
    """Yield (first step, (steps, dim) float32): the features of the 20 ms audio steps of a wave that
    arrives in blocks (any sizes), a chunk of chunk_seconds at a time, holding only one chunk and its
    context of samples.

    Each chunk runs with context_seconds of extra audio on both sides whose steps are dropped, so that
    chunk borders see the same context as the middle; its samples are normalised on their own (zero
    mean, unit variance, as a feature extractor given that stretch would). A step's feature is the mean
    of the last num_layers hidden states. A wave that fits in one chunk is a single forward pass.
    """
    hop, reach = audio_hop(w2v), audio_receptive_field(w2v)
    device = next(w2v.parameters()).device
    chunk = max(1, round(chunk_seconds * SAMPLE_RATE / hop))
    context = math.ceil(context_seconds * SAMPLE_RATE / hop)
    pieces, held, offset = [], 0, 0  # the samples held, and the index of their first one in the wave
    first = 0

    def run(start, stop, first, last, final=False):
        end = None if final else (stop - 1) * hop + reach - offset  # the last window takes the wave's tail too
        samples = np.concatenate(pieces)[start * hop - offset:end]
        wave = normalize_waveform(torch.from_numpy(samples).float()[None]).to(device)
        with autocast(device):
            _, hidden_states = w2v(wave)
        mean = torch.stack(hidden_states[-num_layers:]).float().mean(0)[0]
        return first, mean[first - start:last - start].cpu()

    for block in blocks:
        pieces.append(np.asarray(block, dtype=np.float32))
        held += len(block)
        # a whole chunk and its right context have arrived
        while offset + held >= (first + chunk + context - 1) * hop + reach:
            last = first + chunk
            yield run(max(first - context, 0), last + context, first, last)
            first = last
            keep = max(first - context, 0) * hop - offset  # drop the samples no later chunk needs
            if keep > 0:
                rest = np.concatenate(pieces)[keep:]
                pieces, held, offset = [rest], len(rest), offset + keep
    total = int(w2v.num_steps(offset + held)) if offset + held else 0
    while first < total:
        last = min(first + chunk, total)
        stop = min(last + context, total)
        yield run(max(first - context, 0), stop, first, last, final=stop == total)
        first = last


def audio_step_features(w2v, wave, num_layers=4, chunk_seconds=20.0, context_seconds=2.0):
    """(steps, dim) float32: iter_step_features over a whole wave (a tensor) at once."""
    parts = [f for _, f in iter_step_features(w2v, [wave.float().numpy()], num_layers, chunk_seconds,
                                              context_seconds)]
    return torch.cat(parts) if parts else torch.zeros(0, w2v.cfg.hidden_size)


class FrameAligner:
    """Per video frame, the mean of the audio steps whose centre lies within +/- window seconds of the
    frame's time (the nearest step when none does), gathered from chunks of steps as they come, so that
    only the per-frame features are held. Sums per chunk come from float64 prefix sums."""

    def __init__(self, times, dim, window=0.5):
        self.times = torch.as_tensor(times, dtype=torch.float64)
        self.window = window
        self.sums = torch.zeros(len(self.times), dim)
        self.counts = torch.zeros(len(self.times), dtype=torch.long)
        self.first = self.last = None  # (time, feature) of the first and the last step seen

    def add(self, step_times, features):
        if not len(features):
            return
        if self.first is None:
            self.first = (float(step_times[0]), features[0].clone())
        self.last = (float(step_times[-1]), features[-1].clone())
        lo = torch.searchsorted(step_times, self.times - self.window, side="left")
        hi = torch.searchsorted(step_times, self.times + self.window, side="right")
        reached = torch.nonzero(hi > lo).flatten()
        if not len(reached):
            return
        prefix = F.pad(features.double().cumsum(0), (0, 0, 1, 0))
        lo, hi = lo[reached], hi[reached]
        self.sums[reached] += (prefix[hi] - prefix[lo]).float()
        self.counts[reached] += hi - lo

    def result(self):
        """(frames, dim) float32."""
        out = self.sums / self.counts.clamp_min(1)[:, None]
        empty = self.counts == 0
        if self.first is not None and empty.any():  # frames further than the window from any step
            before = empty & (self.times < self.first[0])
            out[before] = self.first[1]
            out[empty & ~before] = self.last[1]
        return out


def align_audio(step_features, times, hop_seconds=0.02, first_step_time=0.0125, window=0.5, block=4096):
    """FrameAligner over steps at first_step_time + k * hop_seconds, given all at once (block steps a
    chunk). Returns (frames, dim) float32."""
    steps, dim = step_features.shape
    aligner = FrameAligner(times, dim, window)
    step_times = first_step_time + hop_seconds * torch.arange(steps, dtype=torch.float64)
    for begin in range(0, steps, block):
        aligner.add(step_times[begin:begin + block], step_features[begin:begin + block])
    return aligner.result()


def frame_times(num_frames, fps):
    """The middle of each frame: (i + 0.5) / fps."""
    return (torch.arange(num_frames, dtype=torch.float64) + 0.5) / fps


def frame_centres(times):
    """The middle of each frame, from their presentation times: t_i + (t_{i+1} - t_i) / 2 (the last frame
    lasts as long as the one before it). What the audio is aligned to, on the file's clock."""
    times = torch.as_tensor(times, dtype=torch.float64)
    if len(times) < 2:
        return times + 1 / 50
    step = times.diff()
    return times + torch.cat([step, step[-1:]]) / 2


def frame_audio_features(w2v, wave, times, num_layers=4, chunk_seconds=20.0, window=0.5, start=0.0):
    """The audio feature of each video frame: (frames, dim) float32, for frames centred at `times` seconds,
    the wave's first sample being at `start` on the same clock."""
    return stream_frame_audio(w2v, [wave.float().numpy()], start, times, num_layers, chunk_seconds, window)


def stream_frame_audio(w2v, blocks, start, times, num_layers=4, chunk_seconds=20.0, window=0.5, progress=None):
    """frame_audio_features of a wave given as blocks; `start` may be a callable giving it once the first
    block has come (AudioReader sets its start then). progress(frames): called after each chunk with the
    number of frames whose time the sound has reached."""
    hop_seconds = audio_hop(w2v) / SAMPLE_RATE
    first_step_time = audio_receptive_field(w2v) / 2 / SAMPLE_RATE
    aligner = FrameAligner(times, w2v.cfg.hidden_size, window)
    for first, features in iter_step_features(w2v, blocks, num_layers, chunk_seconds):
        origin = start() if callable(start) else start
        step_times = origin + first_step_time + hop_seconds * torch.arange(first, first + len(features),
                                                                           dtype=torch.float64)
        aligner.add(step_times, features)
        if progress is not None and len(step_times):
            progress(int(torch.searchsorted(aligner.times, step_times[-1:])[0]) if len(aligner.times) else 0)
    return aligner.result()


def frame_audio(w2v, video, times, cfg, audio_dim=1024, warn=None, progress=None):
    """(audio (N, Da), audio_present (N,)) for frames at presentation `times` of `video`, its sound streamed.

    audio_present is True where a frame's middle falls on decoded sound. Sound lost to damaged packets
    gives one warning (warn(text), default stderr)."""
    dim = w2v.cfg.hidden_size if w2v is not None else audio_dim
    absent = torch.zeros(len(times), dim), torch.zeros(len(times), dtype=torch.bool)
    if w2v is None or video is None or not len(times):
        return absent
    centres = frame_centres(times)
    reader = AudioReader(video)
    audio = stream_frame_audio(w2v, reader, lambda: reader.start, centres, cfg.audio_layers, cfg.chunk_seconds,
                               cfg.audio_window, progress)
    if reader.lost_seconds:
        (warn or _warn)(f"{video}: {reader.lost_seconds:.2f} s of sound could not be decoded (damaged packets); "
                        "those frames have audio=0")
    if reader.start is None:
        return absent
    return audio, reader.covered(centres)


# ------------------------------------------------------- Stage I: image datasets and transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AFFECTNET_TO_CLASS = (0, 4, 5, 6, 3, 2, 1, 7)  # AffectNet code -> emo class
RAFDB_TO_CLASS = {1: 6, 2: 3, 3: 2, 4: 4, 5: 5, 6: 1, 7: 0}  # RAF-DB 1..7 -> emo class
RAFDB_LIST = Path("EmoLabel") / "list_patition_label.txt"  # sic: RAF-DB's own spelling
PAD_SIDES = {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
             "top-left": ("top", "left"), "top-right": ("top", "right"),
             "bottom-left": ("bottom", "left"), "bottom-right": ("bottom", "right")}
PAD_PATTERNS = tuple(PAD_SIDES)


class PadAug(torch.nn.Module):
    """Random black border bar(s) plus a small shift, like the padding face crops get at the frame's edge.

    With probability p: one of 8 patterns (a bar on one side, or an L on two adjacent sides).
    The content moves 1..max(1, min(10, round(0.02 * min(w, h)))) pixels toward the bar side(s),
    the strip it leaves black; then the bar(s): a single bar covers U(0.03, 0.20) of its side; an L
    has fractions v (of the width) and h (of the height) drawn until v + h - v*h <= 0.20 (50 tries,
    else 0.12 / 0.12), so the bars cover at most 20% of the image. Works on uint8 or float
    (..., C, H, W) tensors and PIL images, in any torchvision pipeline; draws from torch's RNG.
    """

    def __init__(self, p=0.6, min_fraction=0.03, max_fraction=0.20, max_area=0.20, tries=50):
        super().__init__()
        self.p, self.min_fraction, self.max_fraction = p, min_fraction, max_fraction
        self.max_area, self.tries = max_area, tries

    def sample_params(self, h, w, generator=None):
        """dict(apply, pattern, shift, v, h): v / h are the fractions of the width / height that the
        vertical / horizontal bar covers (0 where the pattern has none); shift is in pixels."""
        def uniform(low, high):
            return low + (high - low) * float(torch.rand((), generator=generator))
        apply = float(torch.rand((), generator=generator)) < self.p
        pattern = PAD_PATTERNS[int(torch.randint(len(PAD_PATTERNS), (), generator=generator))]
        max_shift = max(1, min(10, round(0.02 * min(w, h))))
        shift = int(torch.randint(1, max_shift + 1, (), generator=generator))
        sides = PAD_SIDES[pattern]
        if len(sides) == 1:
            fraction = uniform(self.min_fraction, self.max_fraction)
            v, h_ = (fraction, 0.0) if sides[0] in ("left", "right") else (0.0, fraction)
        else:
            for _ in range(self.tries):
                v, h_ = uniform(self.min_fraction, self.max_fraction), uniform(self.min_fraction, self.max_fraction)
                if v + h_ - v * h_ <= self.max_area:
                    break
            else:
                v = h_ = 0.12
        return dict(apply=apply, pattern=pattern, shift=shift, v=v, h=h_)

    def forward(self, image):
        if isinstance(image, Image.Image):
            return to_pil_image(self(pil_to_tensor(image)), mode=image.mode)
        params = self.sample_params(*image.shape[-2:])
        return pad_and_shift(image, params) if params["apply"] else image


def pad_and_shift(image, params):
    """Apply PadAug's drawn parameters to a (..., C, H, W) tensor; returns a new tensor."""
    height, width = image.shape[-2:]
    sides, shift = PAD_SIDES[params["pattern"]], params["shift"]
    dy = -shift if "top" in sides else shift if "bottom" in sides else 0  # toward the bar
    dx = -shift if "left" in sides else shift if "right" in sides else 0
    out = torch.zeros_like(image)
    out[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    bar_w, bar_h = int(params["v"] * width), int(params["h"] * height)  # floor: never past the drawn fraction
    if "left" in sides:
        out[..., :, :bar_w] = 0
    if "right" in sides and bar_w:
        out[..., :, width - bar_w:] = 0
    if "top" in sides:
        out[..., :bar_h, :] = 0
    if "bottom" in sides and bar_h:
        out[..., height - bar_h:, :] = 0
    return out


def train_transform(size=224, crop_scale=0.8, jitter=0.8, grayscale=0.1, blur=0.1, padaug=0.6, erasing=0.25):
    """Stage I training augmentation on a uint8 (C, H, W) image; returns normalised float32.
    The defaults are the recipe's; the keywords are the smallest crop area and the probabilities."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.25, 0.25, 0.15, 0.02)], p=jitter),
        v2.RandomGrayscale(p=grayscale),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=blur),
        PadAug(p=padaug),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(p=erasing, scale=(0.02, 0.12), value=0),
        v2.ToPureTensor(),
    ])


def eval_transform(size=224, resize=256):
    """Shorter side to `resize` (bicubic), centre crop `size`, ImageNet normalisation."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])


def read_image(path):
    """A JPEG or PNG file as a uint8 RGB (3, H, W) tensor; EmoError naming the file otherwise."""
    if not Path(path).is_file():
        raise EmoError(f"{path} does not exist")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except FileNotFoundError:
        raise EmoError(f"{path} does not exist") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise EmoError(f"{path} is not a readable image ({first_line(e)})") from None


def check_labels(labels, source):
    """Labels as a LongTensor, all in 0..7; EmoError naming `source` otherwise."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = (labels < 0) | (labels >= len(CLASSES))
    if bad.any():
        raise EmoError(f"{source}: label {int(labels[bad][0])} is outside 0..{len(CLASSES) - 1}")
    return labels


def check_classes(labels, source="dataset"):
    """Samples per class (LongTensor of 8); EmoError naming the classes that have none."""
    counts = torch.bincount(check_labels(labels, source), minlength=len(CLASSES))
    empty = [CLASSES[i] for i in range(len(CLASSES)) if counts[i] == 0]
    if empty:
        raise EmoError(f"{source} has no samples of {', '.join(empty)}")
    return counts


class ImageDataset(Dataset):
    """Image files with their labels: (transformed image, label 0..7) per item.

    `labels` (a LongTensor) is known without reading any image, for class weights and samplers.
    """

    def __init__(self, paths, labels, transform=None, source="dataset"):
        self.paths = [str(p) for p in paths]
        self.labels = check_labels(labels, source)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if not self.paths:
            raise EmoError(f"{source}: no images found")
        self.transform, self.source = transform, source

    def __len__(self):
        return len(self.paths)

    def fingerprint(self):
        """What identifies this data without reading an image: counts, and a hash of the file names
        with their labels (saved with Stage I checkpoints; a resumed run checks it)."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{path}\t{label}\n".encode())
        return {"source": self.source, "images": len(self.paths),
                "per_class": torch.bincount(self.labels, minlength=len(CLASSES)).tolist(), "sha256": digest.hexdigest()}

    def __getitem__(self, index):
        image = read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class ImageFolderDataset(ImageDataset):
    """A Stage I image set in one of three layouts:

    plain:     <root>/<ClassName>/*.{jpg,jpeg,png}, emo's 8 class names (any case);
    affectnet: <root>/<0..7>/*, AffectNet expression codes, remapped to emo's classes;
    rafdb:     <root>/<1..7>/*, RAF-DB codes (Surprise, Fear, Disgust, Happy, Sad, Anger, Neutral),
               or RAF-DB's release: <root>/EmoLabel/list_patition_label.txt with images in
               <root>/Image/aligned/ (name_aligned.jpg) or <root>/Image/original/.
    split ("train", "test", ...) picks <root>/<split>/ for the folder layouts, and the file-name
    prefix in RAF-DB's list file.
    """

    def __init__(self, root, layout="plain", transform=None, split=None):
        root = Path(root)
        if not root.is_dir():
            raise EmoError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
        if layout not in ("plain", "affectnet", "rafdb"):
            raise EmoError(f"unknown image-set layout {layout!r}; expected plain, affectnet or rafdb")
        if layout == "rafdb" and (root / RAFDB_LIST).is_file():
            paths, labels = rafdb_list_samples(root, split)
        else:
            folder = root / split if split else root
            if not folder.is_dir():
                raise EmoError(f"{folder} does not exist")
            paths, labels = class_folder_samples(folder, folder_classes(layout))
            root = folder
        self.root, self.layout = root, layout
        super().__init__(paths, labels, transform, source=f"{root} ({layout} layout)")


def folder_classes(layout):
    """Folder name (lower case) -> emo class, for a class-folder layout."""
    if layout == "affectnet":
        return {str(code): label for code, label in enumerate(AFFECTNET_TO_CLASS)}
    if layout == "rafdb":
        return {str(code): label for code, label in RAFDB_TO_CLASS.items()}
    return {name.lower(): label for label, name in enumerate(CLASSES)}


def class_folder_samples(root, classes):
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name.lower() not in classes:
            raise EmoError(f"{folder}: folder name is not a class; expected folders named "
                           f"{', '.join(classes)}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += files
        labels += [classes[folder.name.lower()]] * len(files)
    if not paths:
        raise EmoError(f"{root}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files in class "
                       f"folders named {', '.join(classes)})")
    return paths, labels


def rafdb_list_samples(root, split=None):
    """(paths, labels) from RAF-DB's list file; split keeps the names starting with `split`_."""
    list_file = root / RAFDB_LIST
    aligned = (root / "Image" / "aligned").is_dir()
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, code = line.split()
            label = RAFDB_TO_CLASS[int(code)]
        except (ValueError, KeyError):
            raise EmoError(f"{list_file} line {number}: expected '<name>.jpg <1..7>', got {line.strip()!r}") from None
        if split and not name.startswith(f"{split}_"):
            continue
        stem = Path(name).stem
        paths.append(root / "Image" / "aligned" / f"{stem}_aligned.jpg" if aligned else
                     root / "Image" / "original" / name)
        labels.append(label)
    if not paths:
        raise EmoError(f"{list_file}: no images" + (f" in split {split!r}" if split else ""))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EmoError(f"{len(missing)} images listed in {list_file} are missing, e.g. {missing[0]}")
    return paths, labels


PEOPLE = ("largest", "left", "right")  # whose face: the largest one, or the left / right one of two people


def annotation_id(stem, person):
    """ABAW's id for a person in a video: `<stem>` for the largest (or only) face, `<stem>_left` /
    `<stem>_right` for the left / right one of two people."""
    return stem if person == "largest" else f"{stem}_{person}"


def split_annotation_id(annotation_id):
    """(video stem, person) of an annotation id: the inverse of annotation_id."""
    for person in ("left", "right"):
        if annotation_id.endswith(f"_{person}"):
            return annotation_id.removesuffix(f"_{person}"), person
    return annotation_id, "largest"


def read_annotation(path):
    """An ABAW EXPR annotation file: one label per frame (-1 = ignore) as a LongTensor."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise EmoError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EmoError(f"{path} is not a readable annotation file ({e})") from None
    if not lines or lines[0].replace(" ", "").lower() != ABAW_HEADER.lower():
        raise EmoError(f"{path}: first line must be the header {ABAW_HEADER}")
    while lines and not lines[-1].strip():
        lines.pop()
    values = []
    for number, line in enumerate(lines[1:], 2):
        try:
            value = int(line)
        except ValueError:
            raise EmoError(f"{path} line {number}: expected a label -1..{len(CLASSES) - 1}, got {line!r}") from None
        if not IGNORE_LABEL <= value < len(CLASSES):
            raise EmoError(f"{path} line {number}: label {value} is outside -1..{len(CLASSES) - 1}")
        values.append(value)
    if not values:
        raise EmoError(f"{path} has a header but no frame labels")
    return torch.tensor(values, dtype=torch.long)


# The challenge's metric, on ABAW labels (-1 frames left out).

def confusion_matrix(y_true, y_pred, num_classes=len(CLASSES)):
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


def macro_f1(y_true, y_pred, num_classes=len(CLASSES)):
    """Unweighted mean F1 over the classes that occur in the labels or the predictions.

    This is scikit-learn's f1_score(average="macro") after dropping the -1 frames. On the ABAW
    validation set every class occurs, so it is the challenge metric; on a small split a class
    that is absent on both sides is left out instead of counting as F1 = 0.
    """
    counts = confusion_matrix(y_true, y_pred, num_classes)
    occurs = (counts.sum(0) + counts.sum(1)) > 0
    return float(f1_per_class(counts)[occurs].mean()) if occurs.any() else 0.0


class AffWild2Frames(ImageDataset):
    """Aff-Wild2 aligned face crops with their EXPR labels: the frames of each annotation id that
    have a crop (cropped_aligned/<id>/<5-digit 1-based>.jpg) and a label other than -1.

    frames_per_video=K keeps K frames per video spread evenly over its valid frames (all when it
    has fewer): a quick validation set. `frames` holds (annotation id, 1-based frame) per item.
    """

    def __init__(self, cropped_aligned_dir, annotation_dir, frames_per_video=None, transform=None):
        crops, annotations = Path(cropped_aligned_dir), Path(annotation_dir)
        for folder in (crops, annotations):
            if not folder.is_dir():
                raise EmoError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
        if frames_per_video is not None and frames_per_video < 1:
            raise EmoError(f"frames_per_video must be at least 1, got {frames_per_video}")
        files = sorted(annotations.glob("*.txt"))
        if not files:
            raise EmoError(f"{annotations} has no annotation .txt files")
        paths, labels, self.frames, self.videos_without_crops = [], [], [], []
        for file in files:
            video_id, per_frame = file.stem, read_annotation(file)
            folder = crops / video_id
            if not folder.is_dir():
                self.videos_without_crops.append(video_id)
                continue
            present = {p.name for p in folder.iterdir()}  # one listing, not a stat per frame
            valid = [i for i in torch.nonzero(per_frame != IGNORE_LABEL).flatten().tolist()
                     if f"{i + 1:05d}.jpg" in present]
            if frames_per_video is not None and len(valid) > frames_per_video:
                k, n = frames_per_video, len(valid)
                valid = [valid[(2 * j + 1) * n // (2 * k)] for j in range(k)]  # the middles of k equal runs
            paths += [folder / f"{i + 1:05d}.jpg" for i in valid]
            labels += [int(per_frame[i]) for i in valid]
            self.frames += [(video_id, i + 1) for i in valid]
        if not paths:
            raise EmoError(f"no labelled face crops found: {annotations} names {len(files)} videos, none with "
                           f"frames under {crops}/<id>/00001.jpg...")
        super().__init__(paths, labels, transform, source=f"{annotations} with crops in {crops}")


def write_annotation(path, labels):
    """An ABAW EXPR file: the header, then one integer per frame (-1 = ignore)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(ABAW_HEADER + "\n" + "".join(f"{int(v)}\n" for v in labels))


def make_loader(dataset, batch_size, train, workers, sampler=None):
    """A DataLoader: shuffled (unless a sampler is given) and drop_last when training; worker
    processes kept alive between epochs; pinned memory when CUDA is there."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, drop_last=train)


# --------------------------------------------------------------------- Stage II: per-frame features

FEATURES_FORMAT = "emo-features/2"  # 2: sound at its presentation time
FEATURES_SUFFIX = ".features.safetensors"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")


@dataclass
class FrameFeatures:
    """One person in one video, one row per video frame."""
    visual: torch.Tensor         # (N, Dv) float32: scale-averaged Stage I CLS; no-face rows hold the nearest face row's
    audio: torch.Tensor          # (N, Da) float32: frame-aligned wav2vec2 features, zeros without audio
    face: torch.Tensor           # (N,) bool: a face box was used for this frame: detected, or filled between two
    audio_present: torch.Tensor  # (N,) bool: the video has an audio track covering this frame
    times: torch.Tensor          # (N,) float64 seconds, the frames' presentation times
    boxes: torch.Tensor          # (N, 4) float32 x1, y1, x2, y2 in frame pixels, NaN where no face
    detected: torch.Tensor = None  # (N,) bool: the face was detected on this very frame (default: face)

    def __post_init__(self):
        if self.detected is None:
            self.detected = torch.as_tensor(self.face).clone()

    def __len__(self):
        return len(self.face)


@dataclass
class FeatureConfig:
    """Everything that changes the features (the cache key, `key()`), plus batch sizes that do not."""
    scales: tuple = (0.9, 1.2, 1.5)  # crop side / face box side
    crop_size: int = 224
    crop_resize: int = 256
    audio_layers: int = 4            # mean of the last this many wav2vec2 layers
    audio_window: float = 0.5        # seconds either side of a frame
    chunk_seconds: float = 20.0
    stride: int = 1                  # encode every stride-th face frame, interpolate the rest
    detect: DetectConfig = field(default_factory=DetectConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    batch_frames: int = 32           # frames per encoder forward (x len(scales) crops); not in the key
    decode_batch: int = 16           # frames decoded at a time; not in the key

    def __post_init__(self):
        # also rebuilds the config from its asdict() JSON (lists, nested dicts)
        self.scales = tuple(float(s) for s in self.scales)
        if isinstance(self.detect, dict):
            self.detect = DetectConfig(**self.detect)
        if isinstance(self.track, dict):
            self.track = TrackConfig(**self.track)
        if self.stride < 1 or self.batch_frames < 1 or self.decode_batch < 1 or self.detect.every < 1 or not self.scales:
            raise EmoError(f"feature settings need stride, batch_frames, decode_batch, detect.every >= 1 and at least "
                           f"one scale; got stride {self.stride}, batch_frames {self.batch_frames}, decode_batch "
                           f"{self.decode_batch}, detect.every {self.detect.every}, scales {self.scales}")

    def key(self):
        key = asdict(self)
        for name in ("batch_frames", "decode_batch"):
            key.pop(name)
        key["detect"].pop("batch_size")
        return key


# Bring your own boxes: face boxes from any detector, instead of emo's RetinaFace and tracker. One JSON
# file per video (the synthetic dataset's boxes/<video>.json are such files):
#   {"boxes": {"<person>": [[x1, y1, x2, y2] or null, ... one entry per video frame]}}
# in frame pixels as displayed; null where that person has no face. <person> is largest, left or right,
# or an annotation id: <video>_left, <video>_right, and any other key (such as <video>) for largest.
BOXES_SUFFIX = ".json"


def person_of(key):
    """largest | left | right for a boxes-file key (a person, or an annotation id)."""
    return key if key in PEOPLE else split_annotation_id(key)[1]


def read_boxes(path):
    """{person: (N, 4) float32 boxes, NaN where no face} from a boxes JSON file (format above)."""
    content = read_json(path)
    entries = content.get("boxes") if isinstance(content, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise EmoError(f"{path}: expected {{\"boxes\": {{person: [[x1, y1, x2, y2] or null, ...]}}}} "
                       "with one box (or null) per video frame")
    people = {}
    for key, rows in entries.items():
        person = person_of(key)
        if person in people:
            raise EmoError(f"{path}: two box lists for the {person} person ({key} and another); keep one")
        try:
            boxes = torch.tensor([[math.nan] * 4 if row is None else [float(v) for v in row] for row in rows],
                                 dtype=torch.float32).reshape(len(rows), 4)
        except (TypeError, ValueError, RuntimeError):
            raise EmoError(f"{path}: the boxes of {key} must be a list of [x1, y1, x2, y2] or null, "
                           "one per video frame") from None
        known = ~boxes.isnan().any(1)
        if ((boxes[known, 2] <= boxes[known, 0]) | (boxes[known, 3] <= boxes[known, 1])).any():
            frame = int(torch.nonzero(known & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])))[0])
            raise EmoError(f"{path}: box {frame} of {key} is not x1, y1, x2, y2 with x2 > x1 and y2 > y1")
        people[person] = boxes
    if len({len(b) for b in people.values()}) > 1:
        raise EmoError(f"{path}: the people have box lists of different lengths; give one entry per video frame")
    return people


def boxes_for(boxes, person, num_frames, source="the boxes"):
    """The (num_frames, 4) boxes of `person` from {person: boxes}: largest, when not given, is the
    larger of left and right on each frame."""
    if person in boxes:
        chosen = torch.as_tensor(boxes[person], dtype=torch.float32)
    elif person == "largest" and boxes:
        stacked = torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in boxes.values()])
        area = ((stacked[..., 2] - stacked[..., 0]) * (stacked[..., 3] - stacked[..., 1])).nan_to_num(-1.0)
        chosen = stacked.gather(0, area.argmax(0)[None, :, None].expand(1, -1, 4))[0]
    else:
        raise EmoError(f"{source} have no boxes for the {person} person (only {', '.join(boxes) or 'none'}); "
                       "ask for one of those")
    if chosen.shape != (num_frames, 4):
        raise EmoError(f"{source} have {len(chosen)} boxes for the {person} person but the video has {num_frames} "
                       "frames; give one box (or null) per frame")
    return chosen


def _prefetch(iterable, depth=2):
    """Iterate in a background thread, up to `depth` items ahead: decoding (PyAV) and cropping (torch)
    release the GIL, so they overlap with the model work of the consumer. The iterator is advanced and
    closed in that one thread, as PyAV wants a container used from one thread."""
    iterator, end = iter(iterable), object()
    with ThreadPoolExecutor(1, thread_name_prefix="emo-decode") as worker:
        ahead = collections.deque(worker.submit(next, iterator, end) for _ in range(depth))
        try:
            while (item := ahead.popleft().result()) is not end:  # an error in the thread is raised here
                ahead.append(worker.submit(next, iterator, end))
                yield item
        finally:
            for future in ahead:
                future.cancel()
            if hasattr(iterator, "close"):
                worker.submit(iterator.close)


def _nearest(positions, queries):
    """For each query, the index into sorted `positions` of the nearest one (the earlier on ties)."""
    right = torch.searchsorted(positions, queries).clamp(max=len(positions) - 1)
    left = (right - 1).clamp(min=0)
    take_left = (queries - positions[left]).abs() <= (positions[right] - queries).abs()
    return torch.where(take_left, left, right)


def encode_plan(face, stride):
    """Which face frames to encode: every stride-th one of each run of consecutive face frames, and each
    run's last, so interpolation never crosses a stretch without a face. (N,) bool."""
    plan = torch.zeros_like(face)
    frames = torch.nonzero(face).flatten()
    if not len(frames):
        return plan
    breaks = torch.nonzero(frames.diff() > 1).flatten() + 1
    for run_frames in frames.tensor_split(breaks):
        plan[run_frames[::stride]] = True
        plan[run_frames[-1]] = True
    return plan


def fill_rows(values, encoded, face):
    """Rows of `values` (N, D) not encoded: face frames linearly interpolated between the encoded
    frames around them, frames without a face copied from the nearest face frame (in place)."""
    known = torch.nonzero(encoded).flatten()
    if not len(known):
        values.zero_()
        return values
    missing = torch.nonzero(face & ~encoded).flatten()
    if len(missing):
        after = torch.searchsorted(known, missing).clamp(1, len(known) - 1)
        a, b = known[after - 1], known[after]
        # clamped: a face frame before the first encoded one (a track encoded only from its MIN_DETECTIONS-th
        # detection on) takes the nearest encoded frame's features
        weight = ((missing - a).double() / (b - a).clamp(min=1).double()).clamp(0, 1).to(values.dtype)[:, None]
        values[missing] = torch.lerp(values[a], values[b], weight)
    faces = torch.nonzero(face).flatten()
    empty = torch.nonzero(~face).flatten()
    if len(empty):
        values[empty] = values[faces[_nearest(faces, empty)]]
    return values


class _Encoder:
    """Gathers crops of many frames and all scales, and runs them through the encoder in batches of
    cfg.batch_frames frames; each frame's feature is the mean over its scales."""

    def __init__(self, encoder, device, cfg):
        self.encoder, self.device, self.cfg = encoder, device, cfg
        self.outputs = {}  # slot -> [(frame indices, (n, D) features on the CPU)]
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
        self.pending, self.count = [], 0

    def add(self, slot, index, crops):
        self.pending.append((slot, index, crops))
        self.count += len(index)
        while self.count >= self.cfg.batch_frames:
            self.flush(self.cfg.batch_frames)

    def flush(self, limit=None):
        if not self.pending:
            return
        take, size = [], 0
        while self.pending and (limit is None or size < limit):
            slot, index, crops = self.pending.pop(0)
            room = len(index) if limit is None else min(len(index), limit - size)
            if room < len(index):
                self.pending.insert(0, (slot, index[room:], crops[room:]))
            take.append((slot, index[:room], crops[:room]))
            size += room
        self.count -= size
        crops = torch.cat([c for _, _, c in take]).to(self.device, non_blocking=True)
        images = ((crops - self.mean) / self.std).flatten(0, 1)
        with autocast(self.device):
            features = self.encoder.features(images)
        features = features.float().view(size, len(self.cfg.scales), -1).mean(1)
        features = features.cpu()
        start = 0
        for slot, index, _ in take:
            self.outputs.setdefault(slot, []).append((index, features[start:start + len(index)]))
            start += len(index)

    def result(self, slot, num_frames, dim):
        """(num_frames, dim) features of a slot, zeros where nothing was encoded, and the (num_frames,) bool
        mask of the encoded frames."""
        visual, encoded = torch.zeros(num_frames, dim), torch.zeros(num_frames, dtype=torch.bool)
        for index, features in self.outputs.get(slot, ()):
            visual[index], encoded[index] = features, True
        return visual, encoded


@torch.inference_mode()
def people_features(video, encoder, w2v, detector, people=("left", "right"), cfg=FeatureConfig(), device=None,
                    cache_dir=None, progress=True, audio_dim=1024, boxes=None, info=None):
    """{person: FrameFeatures} for several people of one video, from one decoding pass over the frames and
    one streamed pass over the sound. See video_features. info: the video's VideoInfo, when already probed."""
    unknown = [p for p in people if p not in PEOPLE]
    if unknown:
        raise EmoError(f"unknown person {unknown[0]!r}: use largest, left or right")
    video = Path(video)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder.to(device).eval()
    stages = 1 + (w2v is not None)  # the pass over the frames, the pass over the sound: one bar in frames
    frames = (info or probe(video)).frames
    with tqdm(total=frames * stages, desc=video.name, unit="frame", disable=not progress) as bar:
        return _people_features(video, encoder, w2v, detector, people, cfg, device, cache_dir, audio_dim, boxes,
                                bar, stages)


MIN_DETECTIONS = 3  # a track is encoded once it has this many detections: a one-frame false positive is not


def _people_features(video, encoder, w2v, detector, people, cfg, device, cache_dir, audio_dim, boxes, bar, stages):
    """people_features after the set-up: one decoding pass for the faces, one streamed pass for the sound."""
    dim = encoder.backbone.cfg.hidden_size
    batcher = _Encoder(encoder, device, cfg)
    bar.set_postfix_str("faces")
    if boxes is not None:
        num_frames, times, slots, tracks = _given_boxes_pass(video, boxes, people, cfg, batcher, bar)
    else:
        if detector is None:
            raise EmoError("features from raw videos need a face detector or the faces' boxes")
        num_frames, times, slots, tracks = _tracking_pass(video, detector, people, cfg, cache_dir, batcher, bar)
    batcher.flush()
    bar.total, done = num_frames * stages, num_frames  # the true frame count, now known
    bar.n = done
    bar.set_postfix_str("sound")
    audio, present = frame_audio(w2v, video, times, cfg, audio_dim,
                                 progress=lambda frames: bar.update(done + frames - bar.n))
    bar.n = bar.total
    bar.refresh()
    results = {}
    for person, slot, track in zip(people, slots, tracks):
        visual, encoded = batcher.result(slot, num_frames, dim)
        face = ~track.boxes.isnan().any(1)
        results[person] = FrameFeatures(visual=fill_rows(visual, encoded, face), audio=audio, face=face,
                                        audio_present=present, times=times, boxes=track.boxes,
                                        detected=track.detected)
    return results


def _tracking_pass(video, detector, people, cfg, cache_dir, batcher, bar):
    """Decode once: detect each batch (or read the cached detections), link tracks as the frames come,
    and once a frame is track_lag frames old, when every track's filled and smoothed box on it is final,
    crop and encode it for each track that has MIN_DETECTIONS detections. Only those frames are held.
    At the end each person's track is chosen over the whole video (pick_track) and its features kept.
    Returns (frames, times, [slot], [FaceTrack]) per person."""
    lag, stride = track_lag(cfg.track), cfg.stride
    cache, key = _faces_cache(video, detector, cfg.detect, cache_dir)
    cached = _read_faces_cache(cache, key) if cache is not None and cache.exists() else None
    per_frame = cached.per_frame() if cached is not None else None
    tracker = Tracker(cfg.track)
    held = collections.deque()  # (frame index, decoded frame) not yet final: YUV, 1.5 bytes a pixel
    run = {}                    # track -> position of the next frame in its current run of boxes
    times, counts, found_boxes, found_scores = [], [], [], []
    geometry = None             # the frames' coded size and rotation

    def encode_final(upto):
        """Crop and encode the held frames before `upto` (frame upto's boxes are final too); only the frames
        some track needs are converted to RGB."""
        taken = []
        while held and held[0][0] < upto:
            taken.append(held.popleft())
        if not taken:
            return
        first, plans = taken[0][0], {}
        for t, track in enumerate(tracker.tracks):
            if len(track) < MIN_DETECTIONS or tracker.last_seen[t] < first - lag:
                continue
            boxes = final_boxes(track, first, upto + 1, cfg.track)
            known = ~boxes.isnan().any(1)
            plan = []
            for i in range(len(taken)):
                if not known[i]:
                    run[t] = 0
                    continue
                if run.get(t, 0) % stride == 0 or not known[i + 1]:  # every stride-th frame of a run, and its last
                    plan.append(i)
                run[t] = run.get(t, 0) + 1
            if plan:
                plans[t] = (torch.tensor(plan), boxes[plan])
        size, rotation = geometry
        at_once = max(1, MAX_BATCH_BYTES // (3 * size[0] * size[1]))  # frames a crop_decoded call may convert whole
        for t, (plan, boxes) in plans.items():
            for part in range(0, len(plan), at_once):
                index = plan[part:part + at_once]
                batcher.add(t, index + first, crop_decoded([taken[i][1] for i in index.tolist()], boxes[part:part + at_once],
                                                           size, rotation, cfg.scales, cfg.crop_size, cfg.crop_resize))

    processed = 0
    for frames, frame_times, size, rotation in _prefetch(iter_decoded(video, cfg.decode_batch)):
        geometry = (size, rotation)
        if per_frame is not None:
            for offset, (boxes, scores) in enumerate(per_frame[processed:processed + len(frames)]):
                tracker.update(processed + offset, boxes, scores)
        else:
            for offset, face in enumerate(detect_decoded(detector, frames, size, rotation, cfg.detect, processed)):
                boxes, scores = face.boxes.cpu(), face.scores.cpu()
                tracker.update(processed + offset, boxes, scores)
                counts.append(len(scores))
                found_boxes.append(boxes)
                found_scores.append(scores)
        held.extend(zip(range(processed, processed + len(frames)), frames))
        processed += len(frames)
        times.append(frame_times)
        encode_final(processed - lag)
        bar.update(min(processed, bar.total) - bar.n)
    encode_final(processed)
    if cached is None and cache is not None:
        _write_faces_cache(cache, key, video_faces(times, counts, found_boxes, found_scores))
    times = torch.cat(times) if times else torch.zeros(0, dtype=torch.float64)
    slots, tracks = [], []
    for person in people:
        target = pick_track(tracker.tracks, len(range(0, processed, cfg.detect.every)), person, cfg.track)
        slots.append(next((t for t, track in enumerate(tracker.tracks) if track is target), None))
        tracks.append(fill_and_smooth(target or {}, processed, cfg.track))
    return processed, times, slots, tracks


def _given_boxes_pass(video, boxes, people, cfg, batcher, bar):
    """Decode once with the user's own boxes: crop and encode the planned frames of each person as they come.
    Returns (frames, times, [slot], [FaceTrack]) per person."""
    given = read_boxes(boxes) if isinstance(boxes, (str, Path)) else boxes
    source = str(boxes) if isinstance(boxes, (str, Path)) else "the given boxes"
    num_frames = len(next(iter(given.values()))) if given else 0
    chosen = [boxes_for(given, person, num_frames, source) for person in people]
    plans = [encode_plan(~b.isnan().any(1), cfg.stride) for b in chosen]
    times, start = [], 0
    for frames, frame_times, size, rotation in _prefetch(iter_decoded(video, cfg.decode_batch)):
        for slot, (plan, box) in enumerate(zip(plans, chosen)):
            index = torch.nonzero(plan[start:start + len(frames)]).flatten()
            if len(index):
                batcher.add(slot, index + start, crop_decoded([frames[i] for i in index.tolist()], box[index + start],
                                                              size, rotation, cfg.scales, cfg.crop_size, cfg.crop_resize))
        times.append(frame_times)  # a video longer than its boxes: an error below, once its length is known
        start += len(frames)
        bar.update(min(start, bar.total) - bar.n)
    if start != num_frames:
        raise EmoError(f"{source} have {num_frames} boxes for the {people[0]} person but the video has {start} "
                       "frames; give one box (or null) per frame")
    times = torch.cat(times) if times else torch.zeros(0, dtype=torch.float64)
    tracks = [FaceTrack(boxes=b, detected=~b.isnan().any(1)) for b in chosen]
    return num_frames, times, list(range(len(people))), tracks


def video_features(video, encoder, w2v, detector, person="largest", cfg=FeatureConfig(), device=None,
                   cache_dir=None, progress=True, audio_dim=1024, boxes=None):
    """FrameFeatures of one person (largest | left | right) in a video: the fast path, for infer.py too.

    The video is decoded once, in a background thread. Faces are detected (cached in cache_dir when
    given) and linked into tracks as the frames come; a frame is cropped at every scale, for every
    track seen MIN_DETECTIONS times, once its boxes are final (track_lag frames later), and the crops
    of cfg.batch_frames frames at a time go through the encoder (bf16 autocast on CUDA, fp32 on CPU).
    At the end the person's track is chosen over the whole video and its features kept. Memory stays
    bounded: only the last track_lag frames and the per-frame features of each track are held. With cfg.stride N only every N-th face frame
    is encoded and the rows between are interpolated. w2v None (or a silent video): audio zeros of
    audio_dim, audio_present False. The encoder is moved to `device` (default: where it is).

    boxes: your own face boxes instead of the detector and tracker (detector may then be None): a boxes
    JSON file (see read_boxes) or {person: (N, 4) boxes, NaN where no face}, one row per video frame.
    """
    return people_features(video, encoder, w2v, detector, (person,), cfg, device, cache_dir, progress,
                           audio_dim, boxes)[person]


@torch.inference_mode()
def cropped_aligned_features(folder, num_frames, encoder, w2v=None, video=None, cfg=FeatureConfig(), device=None,
                             fps=None, audio_dim=1024, progress=False):
    """FrameFeatures from ABAW's aligned crops `folder/00001.jpg` ... for frames 1..num_frames (one
    scale: the crop itself, through the eval transform). face is False where the jpg is missing, and
    such rows take the nearest crop's feature; boxes are unknown (NaN). The audio comes from `video`
    when given; times are frame index / fps (the video's, else 30)."""
    folder = Path(folder)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder.to(device).eval()
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    face = torch.tensor([f"{i + 1:05d}.jpg" in present for i in range(num_frames)], dtype=torch.bool)
    dim = encoder.backbone.cfg.hidden_size
    visual = torch.zeros(num_frames, dim)
    transform = eval_transform(cfg.crop_size, cfg.crop_resize)

    def load(indices):
        return indices, torch.stack([transform(read_image(folder / f"{i + 1:05d}.jpg")) for i in indices.tolist()])

    indices = torch.nonzero(face).flatten()
    batches = (load(part) for part in indices.split(cfg.batch_frames))
    for index, images in tqdm(_prefetch(batches), total=math.ceil(len(indices) / cfg.batch_frames),
                              desc=f"encode {folder.name}", unit="batch", disable=not progress):
        with autocast(device):
            visual[index] = encoder.features(images.to(device)).float().cpu()
    fill_rows(visual, face, face)
    start = 0.0
    if video is not None:
        info = probe(video)
        fps, start = fps or info.fps, info.start
    times = start + torch.arange(num_frames, dtype=torch.float64) / (fps or 30.0)
    audio, audio_present = frame_audio(w2v, video, times, cfg, audio_dim)
    return FrameFeatures(visual=visual, audio=audio, face=face, audio_present=audio_present, times=times,
                         boxes=torch.full((num_frames, 4), float("nan")))


def _key_text(key):
    return json.dumps(key, sort_keys=True, default=str)


def save_features(path, features, key):
    """Write FrameFeatures atomically as safetensors: visual and audio in fp16, `key` as JSON in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"visual": features.visual.half(), "audio": features.audio.half(), "face": features.face.bool(),
               "audio_present": features.audio_present.bool(), "times": features.times.double(),
               "boxes": features.boxes.float(), "detected": features.detected.bool()}
    save_safetensors(path, tensors, {"format": FEATURES_FORMAT, "key": _key_text(key)})


def _warn_unreadable(path, error):
    _warn(f"feature file {path} is unreadable ({first_line(error)}); extracting again")


def _feature_key(file):
    """The key text of an open feature file (safetensors checks the header against the file's length)."""
    metadata = file.metadata() or {}
    if metadata.get("format") != FEATURES_FORMAT or "key" not in metadata:
        raise ValueError(f"not an {FEATURES_FORMAT} file")
    return metadata["key"]


def stored_key(path):
    """The key JSON a feature file was written with; None when missing, or (with a warning on stderr) damaged.
    Reads only the header."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return _feature_key(f)
    except Exception as e:  # damaged or foreign file: say so; the caller rebuilds it
        _warn_unreadable(path, e)
        return None


def load_features(path, key=None):
    """FrameFeatures from a file save_features wrote, in float32; None when the file is missing or was
    written for another key. A damaged file gives one warning line on stderr and None."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            written_for = _feature_key(f)
            if key is not None and written_for != _key_text(key):
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        features = FrameFeatures(visual=tensors["visual"].float(), audio=tensors["audio"].float(),
                                 face=tensors["face"].bool(), audio_present=tensors["audio_present"].bool(),
                                 times=tensors["times"].double(), boxes=tensors["boxes"].float(),
                                 detected=tensors["detected"].bool())
        n = len(features.face)
        if any(len(t) != n for t in vars(features).values()):
            raise ValueError("its tensors disagree on the number of frames")
        return features
    except Exception as e:
        _warn_unreadable(path, e)
        return None


def features_path(out_dir, annotation_id):
    return Path(out_dir) / f"{annotation_id}{FEATURES_SUFFIX}"


def find_videos(video_root):
    """{video stem: path} of every video under video_root, recursively (Aff-Wild2's batch1/, batch2/ ...)."""
    root = Path(video_root)
    if not root.is_dir():
        raise EmoError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
    videos = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
            continue
        if path.stem in videos:
            raise EmoError(f"two videos named {path.stem}: {videos[path.stem]} and {path}; keep one")
        videos[path.stem] = path
    return videos


def video_for_id(annotation_id, videos):
    """(video path, person) of an annotation id: "<v>" -> (<v>.mp4, "largest"), "<v>_left" -> (<v>.mp4, "left")."""
    stem, person = split_annotation_id(annotation_id)
    for stem, person in ((annotation_id, "largest"), (stem, person)):  # a video may be named <v>_left itself
        if stem in videos:
            return Path(videos[stem]), person
    raise EmoError(f"no video for annotation id {annotation_id} among {len(videos)} videos; expected "
                   f"{annotation_id}.mp4 (or .avi), or for <video>_left / <video>_right ids <video>.mp4")


_video_of = video_for_id  # extract_features has an argument of that name


def _file_stamp(path):
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _crops_stamp(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return {"path": str(folder.resolve()), "files": 0}
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {"path": str(folder.resolve()), "files": len(names), "mtime_ns": folder.stat().st_mtime_ns,
            "names": hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]}


def extract_features(ids, video_for_id, out_dir, encoder_dir, audio_model, detector, cfg=FeatureConfig(), *,
                     audio_revision=None, device=None, cache_dir=None, cropped_aligned=None, annotation_dir=None,
                     boxes=None, rank=None, world=None, progress=True):
    """Write <out_dir>/<id>.features.safetensors for every annotation id of this process's share.

    video_for_id: {video stem: path} (find_videos) or a function id -> (video path, person). The
    encoder is a Stage I directory (load_encoder) or an EmotionClassifier; audio_model a wav2vec2
    id or directory (with audio_revision), a Wav2Vec2, or None for no audio. A file is skipped while
    its key is the same: the video (path, size, mtime), the encoder's, audio model's and detector's
    weights, and cfg.key(). Each file is written atomically, so a killed run resumes where it stopped.
    Under torchrun (RANK / WORLD_SIZE) rank r takes every world-th video (all ids of a two-person
    video go to one rank, which decodes it once). Face detections are cached in cache_dir (default
    <out_dir>/faces).

    cropped_aligned: a folder holding <id>/00001.jpg ...: the visual features come from those crops
    instead (detector unused, may be None); the frame count from <annotation_dir>/<id>.txt when
    given, else from the video, else the last crop; the audio still from the video when there is one.

    boxes: a folder of boxes files <video stem>.json (see read_boxes), your own detector's, used instead
    of the detector (which may then be None); a file's size and time are part of the key.

    Returns {"paths": {id: path}, "written": [ids], "skipped": [ids]} for this process's ids.
    """
    out_dir = Path(out_dir)
    env_rank, env_world, env_device = torchrun_process(join=False)  # the shares need no messages
    rank, world = env_rank if rank is None else rank, env_world if world is None else world
    if cropped_aligned is None and detector is None and boxes is None:
        raise EmoError("features from raw videos need a face detector, or the faces' boxes")
    if boxes is not None and not Path(boxes).is_dir():
        raise EmoError(f"boxes {boxes} is not a folder; pass the folder of <video>.json boxes files")
    if cropped_aligned is not None and not Path(cropped_aligned).is_dir():
        raise EmoError(f"{cropped_aligned} does not exist; pass the cropped_aligned folder")
    sources, groups = _feature_sources(ids, video_for_id, cropped_aligned)
    mine = list(groups.values())[rank::world]

    if device is None and isinstance(encoder_dir, (str, Path)):
        device = env_device
    encoder = load_encoder(encoder_dir, device) if isinstance(encoder_dir, (str, Path)) else encoder_dir
    device = next(encoder.parameters()).device if device is None else torch.device(device)
    w2v = audio_model
    if isinstance(audio_model, (str, Path)):
        w2v = Wav2Vec2.from_pretrained(str(audio_model), audio_revision).to(device)
    # weights by content, so that a moved or re-downloaded checkpoint keeps its features
    base_key = {"format": FEATURES_FORMAT, "encoder": weights_fingerprint(encoder),
                "audio": None if w2v is None else weights_fingerprint(w2v), "features": cfg.key()}
    if cropped_aligned is None and boxes is None:
        base_key["detector"] = weights_fingerprint(detector)
    elif cropped_aligned is not None:
        base_key["features"] = {k: base_key["features"][k] for k in ("crop_size", "crop_resize", "audio_layers",
                                                                      "audio_window", "chunk_seconds")}
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "faces"
    result = {"paths": {}, "written": [], "skipped": []}
    bar = tqdm(total=sum(map(len, mine)), desc="features" + (f" (rank {rank}/{world})" if world > 1 else ""),
               unit="id", disable=not progress)
    for group in mine:
        video = sources[group[0]][0]
        keys = {i: _inputs_key(base_key, i, video, sources[i][1], boxes, cropped_aligned, annotation_dir)
                for i in group}
        result["paths"].update({i: features_path(out_dir, i) for i in group})
        todo = [i for i in group if stored_key(features_path(out_dir, i)) != _key_text(keys[i])]
        result["skipped"] += [i for i in group if i not in todo]
        bar.update(len(group) - len(todo))
        if not todo:
            continue
        if cropped_aligned is None:
            made = people_features(video, encoder, w2v, detector, tuple(sources[i][1] for i in todo), cfg, device,
                                   cache_dir, progress=False,
                                   boxes=_boxes_file(boxes, video) if boxes is not None else None)
            made = {i: made[sources[i][1]] for i in todo}
        else:
            made = {i: cropped_aligned_features(Path(cropped_aligned) / i, _frame_count(i, keys[i], video,
                                                                                           cropped_aligned),
                                                encoder, w2v, video, cfg, device) for i in todo}
        for annotation_id in todo:
            save_features(features_path(out_dir, annotation_id), made[annotation_id], keys[annotation_id])
            result["written"].append(annotation_id)
            bar.update(1)
    bar.close()
    return result


def _feature_sources(ids, video_for_id, cropped_aligned):
    """({id: (video path or None, person)}, {video: [ids]}): every id resolved first, so that a missing video
    fails before any work, and grouped by video, so that a two-person video is decoded once."""
    if isinstance(video_for_id, Mapping):
        videos = video_for_id
        resolve = lambda i: _video_of(i, videos)  # noqa: E731
    elif video_for_id is None:
        if cropped_aligned is None:
            raise EmoError("features from raw videos need the videos: pass find_videos(VIDEO_ROOT)")
        resolve = lambda i: (None, "largest")  # noqa: E731
    else:
        resolve = video_for_id
    sources, groups = {}, {}
    for annotation_id in ids:
        path, person = resolve(annotation_id)
        sources[annotation_id] = (Path(path) if path is not None else None, person)
        groups.setdefault(str(path) if path is not None else f"id:{annotation_id}", []).append(annotation_id)
    return sources, groups


def _inputs_key(base_key, annotation_id, video, person, boxes, cropped_aligned, annotation_dir):
    """What one id's feature file is made from: the inputs whose change means extracting it again."""
    key = dict(base_key, video=_file_stamp(video) if video is not None else None, person=person)
    if boxes is not None and cropped_aligned is None:
        key["boxes"] = _file_stamp(_boxes_file(boxes, video))
    if cropped_aligned is not None:
        key["crops"] = _crops_stamp(Path(cropped_aligned) / annotation_id)
        annotation = Path(annotation_dir) / f"{annotation_id}.txt" if annotation_dir else None
        key["annotation"] = _file_stamp(annotation) if annotation is not None and annotation.is_file() else None
    return key


def _boxes_file(folder, video):
    path = Path(folder) / f"{Path(video).stem}{BOXES_SUFFIX}"
    if not path.is_file():
        raise EmoError(f"no boxes file {path} for {video}; write one per video (see data.read_boxes)")
    return path


def _frame_count(annotation_id, key, video, cropped_aligned):
    """Frames of an id for the cropped_aligned variant: its annotation's, else the video's, else the last crop's."""
    if key.get("annotation"):
        return len(read_annotation(key["annotation"]["path"]))
    if video is not None:
        return probe(video).frames
    numbers = [int(p.stem) for p in (Path(cropped_aligned) / annotation_id).glob("*.jpg") if p.stem.isdigit()]
    if not numbers:
        raise EmoError(f"{Path(cropped_aligned) / annotation_id} has no crops and {annotation_id} has no annotation "
                       "or video to count its frames")
    return max(numbers)


# ---------------------------------------------------------------------------------- command line


def main(argv=None):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe", help="print a video's fps, frame count, size, rotation and audio as JSON")
    p.add_argument("video")
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(asdict(probe(args.video)), indent=2))


if __name__ == "__main__":
    sys.exit(run(main))
