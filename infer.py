"""Frame-level expressions of the people in videos, with their sound: the command most users run first.

    python infer.py video.mp4                     # checkpoint runs/stage2, results in outputs/
    python infer.py videos/ more.avi --ckpt runs/stage2 --out outputs/ --person all --video-out
    python infer.py clip.mp4 --boxes clip.json    # your own detector's face boxes instead of RetinaFace
    python infer.py test_videos/ --submission ABAW_Expr_test_set_sample.txt --out sub/   # -> sub/submission.txt
    python infer.py --check-submission sub/submission.txt --submission ABAW_Expr_test_set_sample.txt
    python infer.py val_videos/ --annotations Validation_Set/ --out val/   # -> val/scores.md, scores.json

Per video: decode, detect and track the face, crop it at several scales, encode the crops with the
Stage I encoder, compute frame-aligned wav2vec 2.0 audio features, fuse them with the Stage II fold
ensemble (logits averaged), smooth the logits over time with the checkpoint's filter, softmax.
Written to --out for each prediction id (`<video stem>`, or `<stem>_left` / `<stem>_right`):

    <id>.csv        one row per video frame: frame,time,label,Neutral,...,Other,face,detected,audio
    <id>.abaw.txt   ABAW submission rows: image_location,Neutral,...,Other then <id>/00001.jpg,<0..7>
    <id>.png        timeline: probability of each class over time, the label strip, face/audio strips
    <id>.mp4        with --video-out: the video with the face box, label and probability drawn

Frames without a face are predicted from their neighbours' visual features and the audio (face=0 in
the CSV). A video with no face at all gets audio-only predictions (face=0 on every row, a warning)
unless --fail-without-face. Every file is written under a temporary name and renamed at the end, so
an error leaves nothing half-written.
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import models
from models import CLASSES, EmoError, atomic_path, first_line, resolve_device, run

DEFAULT_DETECTOR = "py-feat/retinaface"  # MobileNet-0.25, used when the checkpoint names no detector
PERSONS = (*data.PEOPLE, "all")
ABAW_SUBMISSION_HEADER = "image_location," + ",".join(CLASSES)
CSV_HEADER = "frame,time,label," + ",".join(CLASSES) + ",face,detected,audio"
# One colour per class (RGB), for the timeline and the annotated video.
CLASS_COLOURS = ((128, 128, 128), (220, 40, 40), (110, 150, 30), (140, 70, 190),
                 (245, 175, 0), (40, 100, 220), (0, 185, 190), (150, 95, 60))


# ------------------------------------------------------------------------------------ predictions

@dataclasses.dataclass
class VideoPrediction:
    """One person's predictions on every frame of one video (numpy arrays, one row per frame)."""
    id: str                      # <stem>, <stem>_left or <stem>_right: the name of the output files
    video: str                   # path of the video
    person: str                  # the rule that chose the face track: largest, left or right
    fps: float
    width: int
    height: int
    frames: np.ndarray           # (N,) int64: 0-based frame index in decode order (ABAW image 00001.jpg = 0)
    times: np.ndarray            # (N,) float64: presentation time in seconds
    probabilities: np.ndarray    # (N, 8) float32: softmax of the smoothed ensemble logits
    labels: np.ndarray           # (N,) int64: argmax class, 0..7 in CLASSES order
    raw_labels: np.ndarray       # (N,) int64: the argmax before the temporal smoothing
    face: np.ndarray             # (N,) bool: a face box was used (detected, or filled between two detections)
    detected: np.ndarray         # (N,) bool: the face was detected on this very frame (face and not detected: filled)
    audio: np.ndarray            # (N,) bool: the video's sound covers this frame
    boxes: np.ndarray            # (N, 4) float32: x1, y1, x2, y2 in frame pixels, NaN where no face
    audio_only: bool = False     # no face anywhere in the video: predicted from the sound alone

    def __len__(self):
        return len(self.frames)


def prediction_from_logits(logits, raw_logits, features, id, video, person, info):
    """VideoPrediction from the (N, 8) smoothed and raw logits and the person's FrameFeatures."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    face = _numpy(features.face).astype(bool)
    return VideoPrediction(
        id=id, video=str(video), person=person, fps=float(info.fps), width=int(info.width), height=int(info.height),
        frames=np.arange(len(logits), dtype=np.int64), times=_numpy(features.times).astype(np.float64),
        probabilities=probabilities.numpy(), labels=probabilities.argmax(-1).numpy(),
        raw_labels=raw_logits.argmax(-1).numpy(),
        face=face, detected=_numpy(features.detected).astype(bool), audio=_numpy(features.audio_present).astype(bool),
        boxes=_numpy(features.boxes).astype(np.float32), audio_only=not face.any())


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# -------------------------------------------------------------------------------------- predictor

class Predictor:
    """Everything inference needs, loaded once from a Stage II checkpoint directory:

        predictor = Predictor.load("runs/stage2", device="cuda")
        for p in predict_video("clip.mp4", predictor, person="all"):
            print(p.id, p.labels)

    Holds the Stage I encoder, the wav2vec 2.0 model, the face detector, the fold ensemble and the
    checkpoint's smoothing (`smoothing`, a dict kind/window, may be replaced).
    """

    def __init__(self, ensemble, encoder, w2v, detector, info, feature_cfg, device):
        self.ensemble, self.encoder, self.w2v, self.detector = ensemble, encoder, w2v, detector
        self.info, self.feature_cfg, self.device = info, feature_cfg, torch.device(device)
        self.smoothing = dict(info.get("smoothing") or {"kind": "none", "window": 1})
        self.mode = info.get("mode", "fused")
        self._audio_only = None

    @classmethod
    def load(cls, ckpt_dir, device=None, detector=None, stride=1, batch_size=None, detect_every=None):
        """Load a `train.py --stage 2` directory. detector: a hub id, directory or weights file (or a
        loaded RetinaFace) instead of the one the checkpoint names, or "none" when every video comes with
        its own face boxes. stride: encode every stride-th face frame and interpolate the rest.
        detect_every: run the detector on every N-th frame only (the tracker fills the boxes between)
        instead of the checkpoint's setting. batch_size: frames per batch (speed and memory only)."""
        device = resolve_device(device)
        info = models.read_stage2_info(ckpt_dir)
        if not info["encoder"]:
            raise EmoError(f"{Path(ckpt_dir) / 'stage2.json'} names no Stage I encoder (it was trained without "
                           "--encoder), so the visual features cannot be made again; train it again with "
                           "--encoder STAGE1_DIR")
        feature_cfg = feature_config(info, ckpt_dir, stride, batch_size, detect_every)
        ensemble, _ = models.load_stage2(ckpt_dir, device, info)
        encoder = models.load_encoder(_resolve(info["encoder"], ckpt_dir), device)
        w2v = None
        if info.get("audio_model"):
            w2v = models.Wav2Vec2.from_pretrained(_resolve(info["audio_model"], ckpt_dir),
                                                  info.get("audio_revision")).to(device).eval()
        if detector == "none":
            detector = None
        else:
            if not isinstance(detector, torch.nn.Module):
                source = detector or info.get("detector") or DEFAULT_DETECTOR
                detector = models.RetinaFace.from_pretrained(_resolve(source, ckpt_dir))
            detector = detector.to(device).eval()
        check_dimensions(info, encoder, w2v, ckpt_dir)
        return cls(ensemble, encoder, w2v, detector, info, feature_cfg, device)

    def features(self, video, people=("largest",), progress=False, boxes=None, info=None):
        """[(person, FrameFeatures)] for each of `people` (largest, left, right) in a video: one decoding
        and detection pass for all of them. boxes: the faces' own boxes instead of the detector (a boxes
        JSON file or {person: (N, 4)}, see data.read_boxes). info: its data.probe, when already made."""
        if boxes is None and self.detector is None:
            raise EmoError(f"{video}: no face detector was loaded and no boxes were given for it; pass --boxes "
                           "or leave out --detector none")
        # the width of the zeros that stand in for the sound of a checkpoint without an audio model
        audio_dim = self.info["fusion"].get("audio_dim", 1024)  # GatedFusion's default
        found = data.people_features(video, self.encoder, self.w2v, self.detector, tuple(people),
                                     cfg=self.feature_cfg, device=self.device, progress=progress, boxes=boxes,
                                     audio_dim=audio_dim, info=info)
        return [(person, found[person]) for person in people]

    @torch.inference_mode()
    def logits(self, features, smoothed=True):
        """Ensemble logits (N, 8) on the CPU, smoothed over time by the checkpoint's filter unless smoothed=False.
        A person with no face on any frame goes through audio_only_ensemble with zero visual input."""
        visual = features.visual.to(self.device, torch.float32)
        audio = features.audio.to(self.device, torch.float32)
        face = features.face
        model = self.ensemble
        if len(face) and not face.any() and self.mode != "audio":
            model, visual = self.audio_only_ensemble(), torch.zeros_like(visual)
        raw = model(visual, audio)
        if not smoothed:
            return raw.cpu()
        return models.smooth_logits(raw, self.smoothing["kind"], int(self.smoothing["window"])).cpu()

    def audio_only_ensemble(self):
        """The ensemble with each fold's visual input pinned to its training mean.

        The fusion L2-normalises its visual input, then z-scores it with the training mean and std
        (buffers visual_mean / visual_std). In a copy whose visual_mean is zero, a zero visual input
        stays zero after both steps, i.e. it sits exactly at the training mean, which is also what the
        visual input dropout taught the model to read as "no visual information". The audio branch and
        the gate are the trained ones."""
        if self.mode == "visual":
            raise EmoError("the checkpoint's model is visual-only, so a video without any face cannot be "
                           "predicted; use a fused checkpoint or a video where a face is visible")
        if self._audio_only is None:
            model = copy.deepcopy(self.ensemble)
            for fold in model.models:
                fold.visual_mean.zero_()
            self._audio_only = model.eval()
        return self._audio_only


def feature_config(info, ckpt_dir, stride=1, batch_size=None, detect_every=None):
    """data.FeatureConfig of the checkpoint, with --stride, --batch-size and --detect-every applied."""
    try:
        cfg = data.FeatureConfig(**info["features"])
    except TypeError as e:
        raise EmoError(f"{ckpt_dir}: feature settings do not fit this emo ({first_line(e)})") from None
    if stride != 1:  # 1, the default, keeps the checkpoint's stride
        cfg = dataclasses.replace(cfg, stride=stride)
    if detect_every is not None:
        cfg = dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, every=detect_every))
    if batch_size is not None:  # every batch size: they change speed and memory, never the results
        batches = {f.name: batch_size for f in dataclasses.fields(cfg) if "batch" in f.name}
        cfg = dataclasses.replace(cfg, **batches)
    return cfg


def check_dimensions(info, encoder, w2v, ckpt_dir):
    fusion = info["fusion"]  # load_stage2 has built the folds from it
    encoder_dim = encoder.backbone.cfg.hidden_size
    if fusion.get("visual_dim") not in (None, encoder_dim):
        raise EmoError(f"{ckpt_dir} does not fit: its fusion takes {fusion['visual_dim']}-d visual features "
                       f"but the encoder {info['encoder']} gives {encoder_dim}-d ones")
    if w2v is not None and fusion.get("audio_dim") not in (None, w2v.cfg.hidden_size):
        raise EmoError(f"{ckpt_dir} does not fit: its fusion takes {fusion['audio_dim']}-d audio features "
                       f"but {info['audio_model']} gives {w2v.cfg.hidden_size}-d ones")


def _resolve(source, ckpt_dir):
    """A model reference from stage2.json: a path relative to the checkpoint if it exists there, else as given."""
    if source and not Path(source).is_absolute() and (Path(ckpt_dir) / source).exists():
        return str(Path(ckpt_dir) / source)
    return source


# ------------------------------------------------------------------------------------ the pipeline

def person_rules(person):
    """The track rules to run for --person: all = left and right; a tuple of rules is taken as it is."""
    if isinstance(person, tuple) and person and set(person) <= set(data.PEOPLE):
        return person
    if person not in PERSONS:
        raise EmoError(f"unknown --person {person!r}: use {', '.join(PERSONS)}")
    return ("left", "right") if person == "all" else (person,)


def same_track(boxes_a, boxes_b):
    """Whether two persons' boxes are one track: with a single face track in a video, the left and
    the right rule both pick it (and with none, both have NaN everywhere)."""
    a, b = torch.as_tensor(boxes_a), torch.as_tensor(boxes_b)
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def people(stem, person, found):
    """[(id, rule, features)] from [(rule, features)] as tracked for --person. For all: when left and
    right are one and the same track (one face in the video, or none), a single prediction `<stem>`
    with rule largest (the only track is also the largest one)."""
    if person == "all" and len(found) == 2 and same_track(found[0][1].boxes, found[1][1].boxes):
        return [(stem, "largest", found[0][1])]
    return [(data.annotation_id(stem, rule), rule, features) for rule, features in found]


def predict_video(video, predictor, person="largest", fail_without_face=False, progress=False, warn=None,
                  boxes=None, info=None):
    """Predictions for the chosen person(s) in one video: a list of VideoPrediction.

    person: largest (one prediction, id `<stem>`), left / right (`<stem>_left` / `<stem>_right`), or
    all: left and right (`<stem>_left`, `<stem>_right`), collapsing to one prediction `<stem>` when the
    video shows only one face track (or none); or a tuple of those rules, one prediction each, never
    collapsed (the ids an ABAW template names). A video with no face anywhere gets audio-only
    predictions, flagged with audio_only and face=0 (EmoError instead with fail_without_face, or when it
    has no sound either). warn(text) receives the warnings (default: printed to stderr). boxes: the
    faces' own boxes instead of the detector's (a boxes JSON file or {person: (N, 4)}, see data.read_boxes).
    info: the video's data.probe, when the caller has made it already (a video is probed once).
    """
    warn = warn or (lambda text: tqdm.write(f"warning: {text}", file=sys.stderr))
    info = info or data.probe(video)
    rules = person_rules(person)
    predictions = []
    found = predictor.features(video, rules, progress, boxes, info)
    for id, rule, features in people(Path(video).stem, person, found):
        face = features.face
        if len(face) == 0:
            raise EmoError(f"{video} has no decodable video frames; re-encode it")
        if not face.any() and predictor.mode != "audio":
            if fail_without_face:
                raise EmoError(f"{video}: no face found on any of its {len(face)} frames "
                               "(--fail-without-face); check the video, or try another --detector")
            if predictor.w2v is None or not features.audio_present.any():
                raise EmoError(f"{video}: no face found on any of its {len(face)} frames and it has no sound, "
                               "so there is nothing to predict from")
            warn(f"{video}: no face found on any frame; writing audio-only predictions (face=0 on every row)")
        raw = predictor.logits(features, smoothed=False)
        smoothed = models.smooth_logits(raw, predictor.smoothing["kind"], int(predictor.smoothing["window"]))
        predictions.append(prediction_from_logits(smoothed, raw, features, id, video, rule, info))
    return predictions


# ---------------------------------------------------------------------------------------- writers

def write_lines(path, lines):
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_csv(path, prediction):
    """One row per video frame: frame,time,label,<8 probabilities>,face,detected,audio (label = class name)."""
    p = prediction
    lines = [CSV_HEADER]
    columns = zip(p.frames, p.times, p.labels, p.probabilities.astype(np.float64), p.face, p.detected, p.audio)
    for frame, seconds, label, probabilities, face, detected, audio in columns:
        values = ",".join(f"{v:.6f}" for v in probabilities)
        flags = f"{int(face)},{int(detected)},{int(audio)}"
        lines.append(f"{int(frame)},{seconds:.6f},{CLASSES[int(label)]},{values},{flags}")
    write_lines(path, lines)


def write_abaw(path, prediction):
    """ABAW EXPR submission rows: the header, then `<id>/<1-based 5-digit frame>.jpg,<label 0..7>`."""
    p = prediction
    rows = [f"{p.id}/{int(frame) + 1:05d}.jpg,{int(label)}" for frame, label in zip(p.frames, p.labels)]
    write_lines(path, [ABAW_SUBMISSION_HEADER, *rows])


# Timeline layout, in pixels.
TL_LEFT, TL_RIGHT, TL_TITLE, TL_ROW, TL_GAP, TL_LABEL, TL_FLAG, TL_AXIS, TL_LEGEND = 92, 16, 26, 16, 6, 20, 7, 28, 24


def timeline_height():
    return TL_TITLE + len(CLASSES) * TL_ROW + TL_GAP + TL_LABEL + TL_GAP + 2 * TL_FLAG + 2 + TL_AXIS + TL_LEGEND


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def column_summary(times, probabilities, labels, flags, columns):
    """Per pixel column of a time axis: mean probabilities (C, 8), majority label (C,), mean of each
    flag (C, F). Columns no frame falls in take the nearest frame's values."""
    t0 = float(times[0])
    span = max(float(times[-1]) - t0, 1e-9)
    column = np.clip(((times - t0) / span * columns).astype(np.int64), 0, columns - 1)
    counts = np.bincount(column, minlength=columns)
    empty = counts == 0
    centres = t0 + (np.arange(columns) + 0.5) / columns * span
    nearest = np.clip(np.searchsorted(times, centres[empty]), 0, len(times) - 1)

    def column_mean(values):  # (N, K) -> (C, K)
        total = np.zeros((columns, values.shape[1]))
        np.add.at(total, column, values)
        mean = total / np.maximum(counts, 1)[:, None]
        mean[empty] = values[nearest]
        return mean

    majority = column_mean(np.eye(len(CLASSES))[labels]).argmax(1)  # the most frequent label
    return column_mean(probabilities), majority, column_mean(flags)


def tick_step(span, max_ticks=12):
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200):
        if span / step <= max_ticks:
            return step
    return 10 ** math.ceil(math.log10(span / max_ticks))


def write_timeline(path, prediction, width=1200):
    """PNG of the predictions over time (PIL only): a heat strip per class (white = 0, the class colour
    = 1), the label strip, face and audio strips (dark = present), an axis in seconds, a legend."""
    p = prediction
    plot = width - TL_LEFT - TL_RIGHT
    if plot < 50:
        raise EmoError(f"timeline width {width} is too small; use at least {TL_LEFT + TL_RIGHT + 50}")
    canvas = np.full((timeline_height(), width, 3), 255, dtype=np.uint8)
    colours = np.array(CLASS_COLOURS, dtype=np.float64)
    flags = np.stack([p.face, p.audio], 1).astype(np.float64)
    mean_p, majority, mean_f = column_summary(p.times, p.probabilities, p.labels, flags, plot)
    x = slice(TL_LEFT, TL_LEFT + plot)
    for c in range(len(CLASSES)):
        top = TL_TITLE + c * TL_ROW
        canvas[top + 1:top + TL_ROW, x] = (255 - mean_p[:, c, None] * (255 - colours[c])).round().astype(np.uint8)
    label_top = TL_TITLE + len(CLASSES) * TL_ROW + TL_GAP
    canvas[label_top:label_top + TL_LABEL, x] = colours[majority].astype(np.uint8)
    flag_top = label_top + TL_LABEL + TL_GAP
    for k in range(2):
        top = flag_top + k * (TL_FLAG + 1)
        canvas[top:top + TL_FLAG, x] = (235 - mean_f[:, k, None] * 175).round().astype(np.uint8)
    axis_top = flag_top + 2 * TL_FLAG + 2

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    small = font(11)

    def write(xy, text, font=small):
        draw.text(xy, text, fill=(0, 0, 0), font=font)

    duration = float(p.times[-1] - p.times[0])
    flagged = " - no face found: audio-only" if p.audio_only else ""
    write((6, 6), f"{p.id}: {len(p)} frames, {duration:.1f} s at {p.fps:.2f} fps{flagged}", font(13))
    for c, name in enumerate(CLASSES):
        write((6, TL_TITLE + c * TL_ROW + 2), name)
    write((6, label_top + 4), "label")
    write((6, flag_top - 2), "face", font(9))
    write((6, flag_top + TL_FLAG - 1), "audio", font(9))
    draw.rectangle([TL_LEFT - 1, TL_TITLE, TL_LEFT + plot, flag_top + 2 * TL_FLAG + 1], outline=(60, 60, 60))
    draw.line([TL_LEFT, axis_top, TL_LEFT + plot, axis_top], fill=(0, 0, 0))
    t0 = float(p.times[0])
    step = tick_step(max(duration, 1e-3))
    for k in range(math.ceil(t0 / step - 1e-9), math.floor((t0 + duration) / step + 1e-9) + 1):
        tick = round(k * step, 6)  # a multiple of the step, without accumulated rounding
        px = TL_LEFT + (tick - t0) / duration * plot if duration > 0 else TL_LEFT
        draw.line([px, axis_top, px, axis_top + 4], fill=(0, 0, 0))
        write((px - 3 * len(f"{tick:g}"), axis_top + 6), f"{tick:g}")
    write((6, axis_top + 6), "time (s)")
    legend_top = axis_top + TL_AXIS
    slot = (width - 12) / len(CLASSES)
    for c, name in enumerate(CLASSES):
        lx = 6 + c * slot
        draw.rectangle([lx, legend_top + 4, lx + 12, legend_top + 16], fill=CLASS_COLOURS[c], outline=(0, 0, 0))
        write((lx + 16, legend_top + 4), name)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image.size


def write_annotated_video(path, predictions, video, batch_size=32):
    """The video re-encoded (H.264, or MPEG-4 Part 2 where libx264 is missing) at its average frame rate
    (frame i at i / fps, so a variable-rate video keeps its frames but not their exact times), with each
    person's face box, label and probability drawn. The sound is not copied. Odd frame sizes lose their
    last row / column (the encoders need even ones). Returns the number of frames written."""
    first = predictions[0]  # carries the video's fps and size, as probed for the predictions
    n = len(first)
    width, height = first.width - first.width % 2, first.height - first.height % 2
    rate = Fraction(first.fps if first.fps > 0 else 25).limit_denominator(1001)
    text_font = font(max(12, height // 22))
    line = max(2, height // 180)
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        try:
            stream = out.add_stream("libx264", rate=rate, options={"crf": "20", "preset": "veryfast"})
        except (av.FFmpegError, ValueError):
            stream = out.add_stream("mpeg4", rate=rate)
            stream.bit_rate = 4_000_000
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frames = (frame for batch, _ in data.iter_frames(video, batch_size) for frame in batch.numpy())
        written = 0
        for index, frame in enumerate(frames):
            image = Image.fromarray(frame[:height, :width])
            if index < n:
                draw_predictions(ImageDraw.Draw(image), predictions, index, text_font, line)
            encoded = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            encoded.pts = index
            out.mux(stream.encode(encoded))
            written += 1
        out.mux(stream.encode())
    return written


def draw_predictions(draw, predictions, index, text_font, line):
    """Each person's box on frame `index`, and its label and probability on the class colour."""
    size = getattr(text_font, "size", 11)
    for row, p in enumerate(predictions):
        label = int(p.labels[index])
        colour = CLASS_COLOURS[label]
        text = f"{CLASSES[label]} {p.probabilities[index, label]:.2f}"
        if len(predictions) > 1:
            text = f"{p.person}: {text}"
        box = p.boxes[index]
        if p.face[index] and np.isfinite(box).all():
            draw.rectangle(box.tolist(), outline=colour, width=line)
            x, y = float(box[0]), float(box[1]) - size - 8  # above the box, or below it at the top edge
            if y < 0:
                y = float(box[3]) + 2
        else:
            text += " (no face)"
            x, y = 4.0, 4.0 + row * (size + 10)
        left, top, right, bottom = draw.textbbox((x + 3, y + 2), text, font=text_font)
        draw.rectangle([left - 3, top - 2, right + 3, bottom + 2], fill=colour)
        draw.text((x + 3, y + 2), text, fill=(255, 255, 255), font=text_font)


def write_outputs(out, predictions, video_out=False, batch_size=32):
    """Every output file of one video's predictions, all-or-nothing: each is written under a temporary
    name, and they are renamed only when all are complete. Returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with contextlib.ExitStack() as stack:
        for p in predictions:
            for suffix, write in ((".csv", write_csv), (".abaw.txt", write_abaw), (".png", write_timeline)):
                path = out / f"{p.id}{suffix}"
                write(stack.enter_context(atomic_path(path)), p)
                written.append(path)
        if video_out:
            video = predictions[0].video
            mp4 = out / f"{predictions[0].id if len(predictions) == 1 else Path(video).stem}.mp4"
            write_annotated_video(stack.enter_context(atomic_path(mp4)), predictions, video, batch_size)
            written.append(mp4)
    return written


# ------------------------------------------------------------------------------ the ABAW submission
# The organisers ship a template: the header below, then one row `<id>/<frame>.jpg,<label>` per frame of
# every test id, pre-filled. The submission is the same rows in the same order, each labelled 0..7.

SUBMISSION_HEADER = "image_location," + ",".join(CLASSES)
TEMPLATE_ROW = re.compile(r"(([^/\\]+)/(\d+)\.jpg),(-?\d+)")
LABELS = frozenset(str(label) for label in range(len(CLASSES)))


def safe_id(annotation_id, where):
    """An id that may name output files: no path separator (the row syntax excludes it), no '..', no leading dot."""
    if annotation_id.startswith(".") or ".." in annotation_id:
        raise EmoError(f"{where}: id {annotation_id!r} cannot name a file (a leading dot or '..'); rename it")
    return annotation_id


def template_rows(path):
    """Yield (line number, image location, id, frame, label text) of a template or submission file, after
    checking its header; one EmoError line for the first row that is not `<id>/<digits>.jpg,<int>`."""
    try:
        file = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise EmoError(f"{path} does not exist" if not Path(path).exists() else f"{path}: {first_line(e)}") from None
    with file:
        header = file.readline().strip()
        if header.replace(" ", "") != SUBMISSION_HEADER:
            raise EmoError(f"{path}: the first line must be {SUBMISSION_HEADER}, not {header[:80]!r}")
        for number, line in enumerate(file, 2):
            row = TEMPLATE_ROW.fullmatch(line.rstrip("\r\n"))
            if row is None:
                raise EmoError(f"{path} line {number}: expected <id>/<frame>.jpg,<label>, got {line.strip()[:80]!r}")
            yield number, row[1], row[2], int(row[3]), row[4]


def read_template(path):
    """{id: (rows,) int64 frame numbers, 1-based, in the template's order} of an ABAW template, checked: the
    header, the row syntax, ids that can name files, frame numbers from 1, no row twice, at least one row."""
    frames = {}
    for number, _, annotation_id, frame, _ in template_rows(path):
        if annotation_id not in frames:
            frames[safe_id(annotation_id, f"{path} line {number}")] = []
        frames[annotation_id].append(frame)
    if not frames:
        raise EmoError(f"{path} has a header but no rows")
    template = {annotation_id: np.asarray(numbers) for annotation_id, numbers in frames.items()}
    for annotation_id, numbers in template.items():
        unique, counts = np.unique(numbers, return_counts=True)
        if unique[0] < 1:
            raise EmoError(f"{path}: {annotation_id} has frame {unique[0]}; frames are numbered from 1")
        if (counts > 1).any():
            raise EmoError(f"{path}: the row of {annotation_id} frame {unique[counts > 1][0]} is there "
                           f"{counts.max()} times; keep one")
    return template


def id_jobs(ids, videos, source):
    """[(video, (person, ...))]: the videos that annotation ids name (`<v>_left` / `<v>_right` share `<v>`),
    each with the people to predict; one error naming every id without a video."""
    by_stem = {video.stem: video for video in videos}
    jobs, missing = {}, []
    for annotation_id in ids:
        stem, person = data.split_annotation_id(annotation_id)
        if annotation_id in by_stem:
            stem, person = annotation_id, "largest"
        if stem in by_stem:
            jobs.setdefault(by_stem[stem], []).append(person)
        else:
            missing.append(annotation_id)
    if missing:
        raise EmoError(f"{source}: {len(missing)} id(s) have no video among the inputs: {', '.join(missing[:8])}"
                       + (", ..." if len(missing) > 8 else "") + " (expected <id>.mp4, or <video>.mp4 for "
                       "<video>_left / <video>_right)")
    return [(video, tuple(people)) for video, people in jobs.items()]


def write_submission(path, template_path, labels):
    """The template's rows, in its order, each with emo's label for its id and frame; a frame past the last
    decoded one takes the last one's label. labels: {id: (frames,) labels}. Returns the rows filled so."""
    filled = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write(SUBMISSION_HEADER + "\n")
        for _, location, annotation_id, frame, _ in template_rows(template_path):
            predicted = labels[annotation_id]
            filled += frame > len(predicted)
            out.write(f"{location},{predicted[min(frame, len(predicted)) - 1]}\n")
    return filled


def check_submission(path, template_path):
    """The number of rows of a submission that has its template's header and rows, in order, each labelled
    0..7; one EmoError line at the first problem otherwise."""
    expected = template_rows(template_path)
    rows = 0
    for number, location, _, _, label in template_rows(path):
        wanted = next(expected, None)
        if wanted is None:
            raise EmoError(f"{path} line {number}: {location} is past the template's last row ({rows} rows)")
        if location != wanted[1]:
            raise EmoError(f"{path} line {number}: {location} where the template has {wanted[1]}")
        if label not in LABELS:
            raise EmoError(f"{path} line {number}: label {label} is not one of 0..{len(CLASSES) - 1}")
        rows += 1
    left = next(expected, None)
    if left is not None:
        raise EmoError(f"{path} ends after {rows} rows; the template goes on (line {left[0]}: {left[1]})")
    return rows


# ------------------------------------------------------------------------------------ validation

def read_annotations(folder):
    """{id: (frames,) labels} of every ABAW annotation file <id>.txt in a folder (e.g. Validation_Set/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmoError(f"--annotations {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise EmoError(f"--annotations {folder} holds no ABAW annotation files (<id>.txt)")
    return {safe_id(file.stem, str(folder)): data.read_annotation(file).numpy() for file in files}


def fit_labels(predicted, length):
    """Predicted labels fitted to an annotation's length: cut, or extended with the last decoded frame's."""
    return np.concatenate([predicted[:length], np.full(max(0, length - len(predicted)), predicted[-1])])


def score(annotations, predictions):
    """The challenge's scores of {id: labels} predictions against {id: annotation labels}: Macro-F1 over all
    frames pooled (-1 frames left out) and per class, and per id; raw and smoothed; frame-count mismatches."""
    result = {"ids": {}, "mismatches": {}}
    pooled = {"raw": ([], []), "smoothed": ([], [])}
    for annotation_id, truth in annotations.items():
        prediction = predictions[annotation_id]
        if len(prediction) != len(truth):
            result["mismatches"][annotation_id] = {"annotated": len(truth), "decoded": len(prediction)}
        per_id = {"frames": int((truth != -1).sum())}
        for kind, labels in (("raw", prediction.raw_labels), ("smoothed", prediction.labels)):
            fitted = fit_labels(labels, len(truth))
            pooled[kind][0].append(truth)
            pooled[kind][1].append(fitted)
            per_id[kind] = round(data.macro_f1(truth, fitted), 4)
        result["ids"][annotation_id] = per_id
    for kind, (truth, fitted) in pooled.items():
        truth, fitted = np.concatenate(truth), np.concatenate(fitted)
        per_class = data.f1_per_class(data.confusion_matrix(truth, fitted))
        result[kind] = {"macro_f1": round(data.macro_f1(truth, fitted), 4),
                        "f1": dict(zip(CLASSES, per_class.round(4).tolist()))}
    return result


def write_scores(out, scores):
    """OUT/scores.json and OUT/scores.md."""
    models.save_json(out / "scores.json", scores)
    lines = ["| | Macro-F1 | " + " | ".join(CLASSES) + " |", "| --- " * (len(CLASSES) + 2) + "|"]
    for kind in ("raw", "smoothed"):
        lines.append(f"| {kind} | {scores[kind]['macro_f1']:.4f} | "
                     + " | ".join(f"{scores[kind]['f1'][name]:.4f}" for name in CLASSES) + " |")
    lines += ["", "| id | labelled frames | raw | smoothed |", "| --- | --- | --- | --- |"]
    lines += [f"| {i} | {s['frames']} | {s['raw']:.4f} | {s['smoothed']:.4f} |" for i, s in scores["ids"].items()]
    if scores["mismatches"]:
        lines += ["", "Frame counts that differ (the annotation's count is scored; missing frames take the last "
                  "decoded frame's label):", ""]
        lines += [f"- {i}: annotated {m['annotated']}, decoded {m['decoded']}" for i, m in scores["mismatches"].items()]
    write_lines(out / "scores.md", lines)


# ------------------------------------------------------------------------------------ command line

def find_inputs(paths):
    """Video files from the command line: files as given, folders searched recursively for video suffixes."""
    videos = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = list(data.find_videos(path).values())
            if not found:
                raise EmoError(f"{path} holds no videos ({', '.join(data.VIDEO_SUFFIXES)})")
            videos += found
        elif path.exists():
            videos.append(path)
        else:
            raise EmoError(f"{path} does not exist")
    stems = {}
    for video in videos:
        first = stems.setdefault(video.stem, video.resolve())
        if first != video.resolve():
            raise EmoError(f"two videos are named {video.stem}: {first} and {video}; their outputs "
                           "would overwrite each other, so run them into different --out folders")
    return list(dict.fromkeys(videos))


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser():
    description, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="infer.py", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="VIDEO", help="video files, or folders searched recursively for them")
    p.add_argument("--ckpt", default="runs/stage2", metavar="DIR",
                   help="Stage II checkpoint: the --out of train.py --stage 2 (default %(default)s)")
    p.add_argument("--out", default="outputs", metavar="DIR",
                   help="output folder, created if missing (default %(default)s)")
    p.add_argument("--person", choices=PERSONS, default="largest",
                   help="whose face: the largest (default), the left or right one of two, or all: left and right "
                        "(one prediction when the video shows only one face)")
    p.add_argument("--stride", type=positive_int, default=1, metavar="N",
                   help="encode every N-th face frame and interpolate the features between (faster, default 1)")
    p.add_argument("--detect-every", type=positive_int, default=None, metavar="N",
                   help="run the face detector on every N-th frame only; the tracker fills the boxes between "
                        "(faster; default: the checkpoint's setting, 1 unless it says otherwise)")
    p.add_argument("--video-out", action="store_true", help="also write <id>.mp4 with the box and label on each frame "
                   "(no sound)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="frames per batch through the decoder, detector and encoder (speed and memory only)")
    p.add_argument("--fail-without-face", action="store_true",
                   help="stop with an error on a video without any face, instead of writing audio-only predictions")
    p.add_argument("--detector", metavar="ID_OR_PATH",
                   help="RetinaFace weights (hub id, folder or file) instead of those the checkpoint names")
    p.add_argument("--boxes", metavar="FILE_OR_DIR",
                   help="your own detector's face boxes instead of RetinaFace: a JSON file (one video) or a folder "
                        "of <video stem>.json, each {\"boxes\": {person: [[x1, y1, x2, y2] or null, ...]}} with one "
                        "entry per frame, person largest, left or right (or <stem>, <stem>_left, <stem>_right)")
    p.add_argument("--submission", metavar="TEMPLATE",
                   help="ABAW template (image_location,Neutral,...,Other then <id>/<frame>.jpg,<label> rows): predict "
                        "every id it names (<v>_left / <v>_right: that person of <v>.mp4, else the largest face) and "
                        "write OUT/submission.txt, its rows in its order, each labelled")
    p.add_argument("--annotations", metavar="DIR",
                   help="ABAW annotation files (<id>.txt, e.g. Validation_Set/): predict every id and write "
                        "OUT/scores.md and OUT/scores.json, the challenge's Macro-F1 pooled over all frames, per "
                        "class and per id, raw and smoothed")
    p.add_argument("--check-submission", metavar="FILE",
                   help="check FILE against --submission TEMPLATE (header, rows in order, labels 0..7) and exit")
    return p


def boxes_for_video(boxes, video, videos):
    """The boxes file of one input video for --boxes: the file itself (one video only), or <dir>/<stem>.json."""
    if boxes is None:
        return None
    path = Path(boxes)
    if path.is_dir():
        file = path / f"{Path(video).stem}.json"
        if not file.is_file():
            raise EmoError(f"--boxes {path} has no {file.name} for {video}; write one boxes file per video")
        return file
    if not path.is_file():
        raise EmoError(f"--boxes {path} does not exist")
    if len(videos) > 1:
        raise EmoError(f"--boxes {path} is one file but there are {len(videos)} videos; pass a folder of "
                       "<video stem>.json files instead")
    return path


def main(argv=None):
    args = parser().parse_args(argv)
    if args.check_submission:
        if not args.submission:
            raise EmoError("--check-submission FILE needs --submission TEMPLATE, the template it answers")
        rows = check_submission(args.check_submission, args.submission)
        print(f"{args.check_submission}: {rows} rows, those of {args.submission} in its order, each labelled 0..7")
        return
    if not args.inputs:
        raise EmoError("give the videos: files, or folders searched recursively for them")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EmoError(f"--out {out} exists and is not a folder")
    videos = find_inputs(args.inputs)
    template = read_template(args.submission) if args.submission else {}
    annotations = read_annotations(args.annotations) if args.annotations else {}
    wanted = list(dict.fromkeys([*template, *annotations]))  # the ids to predict, when a file names them
    jobs = id_jobs(wanted, videos, args.submission or args.annotations) if wanted else [(v, args.person) for v in videos]
    probed = {}
    for video, _ in jobs:  # every input checked before any work: missing, unreadable, no video stream
        probed[video] = data.probe(video)
        boxes_for_video(args.boxes, video, videos)
    detector = "none" if args.boxes and not args.detector else args.detector
    predictor = Predictor.load(args.ckpt, args.device, detector, args.stride, args.batch_size, args.detect_every)
    created = not out.exists()
    predicted, frames = {}, 0
    try:
        for number, (video, person) in enumerate(jobs, 1):
            start = time.perf_counter()
            predictions = predict_video(video, predictor, person, args.fail_without_face, progress=True,
                                        boxes=boxes_for_video(args.boxes, video, videos), info=probed[video])
            written = write_outputs(out, predictions, args.video_out, args.batch_size or 32)
            predicted.update((p.id, p) for p in predictions)
            seconds = time.perf_counter() - start
            n = len(predictions[0])
            frames += n
            tqdm.write(f"[{number}/{len(jobs)}] {video}: {n} frames in {seconds:.1f} s "
                       f"({n / max(seconds, 1e-9):.1f} frames/s) -> " + ", ".join(p.name for p in written),
                       file=sys.stderr)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an error before the first video's outputs: leave no trace
    if annotations:
        scores = score(annotations, predicted)
        write_scores(out, scores)
        tqdm.write(f"validation: Macro-F1 {scores['smoothed']['macro_f1']:.4f} smoothed, {scores['raw']['macro_f1']:.4f} "
                   f"raw, over {len(annotations)} ids ({len(scores['mismatches'])} with another frame count than "
                   f"their video); {out / 'scores.md'}", file=sys.stderr)
    if template:
        filled = write_submission(out / "submission.txt", args.submission, {i: p.labels for i, p in predicted.items()})
        rows = sum(len(numbers) for numbers in template.values())
        tqdm.write(f"submission: {out / 'submission.txt'}, {rows} rows over {len(template)} ids; {filled} rows past "
                   "the last decoded frame of their video took that frame's label", file=sys.stderr)
    tqdm.write(f"done: {len(jobs)} video(s), {frames} frames, outputs in {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(main))
