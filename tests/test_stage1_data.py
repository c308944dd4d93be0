"""data.py, Stage I: PadAug, the train / eval transforms, image-set layouts, Aff-Wild2 frames, loaders."""
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import data
import emo
from models import CLASSES, EmoError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    emo.synthesize(emo.SynthConfig(out=str(out), videos=4, frames=40, width=96, height=72, images=2))
    return out


def write_image(path, colour=(200, 100, 50), size=(20, 16)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def class_of(dataset):
    """Folder name -> class name, over the whole dataset."""
    return {Path(p).parent.name: CLASSES[int(label)] for p, label in zip(dataset.paths, dataset.labels)}


def write_annotation(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data.ABAW_HEADER + "\n" + "".join(f"{v}\n" for v in labels))


# ---------------------------------------------------------------------------------- PadAug

def test_padaug_draws_every_pattern_within_bounds():
    pad = data.PadAug()
    generator = torch.Generator().manual_seed(0)
    for (h, w), max_shift in (((224, 224), 4), ((72, 96), 1), ((1000, 800), 10), ((10, 10), 1)):
        seen = set()
        for _ in range(300):
            params = pad.sample_params(h, w, generator=generator)
            seen.add(params["pattern"])
            assert 1 <= params["shift"] <= max_shift
            sides = data.PAD_SIDES[params["pattern"]]
            v, hh = params["v"], params["h"]
            assert (v > 0) == any(s in ("left", "right") for s in sides)
            assert (hh > 0) == any(s in ("top", "bottom") for s in sides)
            for fraction in (v, hh):
                assert fraction == 0 or 0.03 <= fraction <= 0.20
            assert v + hh - v * hh <= 0.20 + 1e-9
        assert seen == set(data.PAD_PATTERNS)


def test_padaug_applies_with_probability_p():
    pad = data.PadAug()
    generator = torch.Generator().manual_seed(1)
    applied = sum(pad.sample_params(64, 64, generator=generator)["apply"] for _ in range(3000))
    assert abs(applied / 3000 - 0.6) < 0.035  # ~4 standard deviations
    torch.manual_seed(2)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    changed = sum(bool((pad(white) != white).any()) for _ in range(400))
    assert abs(changed / 400 - 0.6) < 0.1


def test_padaug_bars_cover_at_most_20_percent_and_the_shift_leaves_a_strip():
    pad = data.PadAug(p=1.0)
    h, w = 120, 160
    white = torch.full((3, h, w), 255, dtype=torch.uint8)
    for seed in range(200):
        torch.manual_seed(seed)
        params = pad.sample_params(h, w)
        torch.manual_seed(seed)
        out = pad(white)  # draws the same parameters
        black = (out == 0).all(0)
        assert ((out == 0) | (out == 255)).all() and (black == (out == 0).any(0)).all()
        sides, shift = data.PAD_SIDES[params["pattern"]], params["shift"]
        bars = torch.zeros(h, w, dtype=torch.bool)
        bar_w, bar_h = int(params["v"] * w), int(params["h"] * h)
        bars[:, :bar_w] |= "left" in sides
        bars[:, w - bar_w:] |= "right" in sides and bar_w > 0
        bars[:bar_h, :] |= "top" in sides
        bars[h - bar_h:, :] |= "bottom" in sides and bar_h > 0
        strip = torch.zeros(h, w, dtype=torch.bool)  # left behind on the side opposite the bar
        strip[:, w - shift:] |= "left" in sides
        strip[:, :shift] |= "right" in sides
        strip[h - shift:, :] |= "top" in sides
        strip[:shift, :] |= "bottom" in sides
        assert torch.equal(black, bars | strip), params
        assert 0 < bars.float().mean() <= 0.20


def test_padaug_shifts_content_toward_the_bar():
    image = torch.arange(3 * 40 * 50, dtype=torch.float32).reshape(3, 40, 50) + 1
    out = data.pad_and_shift(image, dict(apply=True, pattern="left", shift=2, v=0.1, h=0.0))
    assert (out[:, :, :5] == 0).all() and (out[:, :, -2:] == 0).all()
    assert torch.equal(out[:, :, 5:-2], image[:, :, 7:])
    out = data.pad_and_shift(image, dict(apply=True, pattern="bottom-right", shift=3, v=0.1, h=0.2))
    assert (out[:, -8:, :] == 0).all() and (out[:, :, -5:] == 0).all()
    assert (out[:, :3, :] == 0).all() and (out[:, :, :3] == 0).all()
    assert torch.equal(out[:, 3:-8, 3:-5], image[:, :-11, :-8])


def test_padaug_is_deterministic_and_keeps_type_and_shape():
    pad = data.PadAug(p=1.0)
    for image in (torch.randint(1, 256, (3, 48, 64), dtype=torch.uint8), torch.rand(2, 3, 48, 64) + 0.1):
        torch.manual_seed(5)
        first = pad(image)
        torch.manual_seed(5)
        assert torch.equal(first, pad(image))
        assert first.dtype == image.dtype and first.shape == image.shape and not torch.equal(first, image)
    picture = Image.new("RGB", (64, 48), (255, 255, 255))
    padded = pad(picture)
    assert isinstance(padded, Image.Image) and padded.size == picture.size and padded.mode == "RGB"
    assert 0 < (pil_to_tensor(padded) == 0).all(0).float().mean() <= 0.2 + 1 / 48  # bars + a 1 px shift strip


# ------------------------------------------------------------------------------- transforms

def test_eval_transform_resizes_crops_and_normalises():
    image = torch.tensor([128, 64, 255], dtype=torch.uint8)[:, None, None].expand(3, 300, 400).contiguous()
    out = data.eval_transform()(image)
    assert type(out) is torch.Tensor and out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(out.mean((1, 2)), expected, atol=1e-3)
    assert data.eval_transform(size=32, resize=36)(image).shape == (3, 32, 32)


def test_train_transform_gives_normalised_float_crops():
    torch.manual_seed(0)
    transform = data.train_transform()
    image = torch.randint(0, 256, (3, 120, 100), dtype=torch.uint8)
    for _ in range(3):
        out = transform(image)
        assert type(out) is torch.Tensor and out.shape == (3, 224, 224) and out.dtype == torch.float32
        assert out.min() < -1 and out.max() > 1  # normalised, not 0..1
    assert any(isinstance(t, data.PadAug) for t in transform.transforms)


# ---------------------------------------------------------------------------- image datasets

def test_plain_layout_any_case_and_suffix(tmp_path, synth):
    write_image(tmp_path / "happiness" / "a.jpg")
    write_image(tmp_path / "NEUTRAL" / "b.png")
    write_image(tmp_path / "Other" / "c.JPEG")
    (tmp_path / "Other" / "notes.txt").write_text("not an image")
    dataset = data.ImageFolderDataset(tmp_path)
    assert class_of(dataset) == {"happiness": "Happiness", "NEUTRAL": "Neutral", "Other": "Other"}
    image, label = dataset[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.uint8 and isinstance(label, int)
    images = data.ImageFolderDataset(synth / "images", transform=data.eval_transform(size=32, resize=36))
    assert len(images) == 16 and images.labels.dtype == torch.long
    assert torch.equal(data.check_classes(images.labels), torch.full((8,), 2))
    assert images[3][0].shape == (3, 32, 32)


def test_affectnet_folders_are_remapped(tmp_path):
    for code in range(8):
        write_image(tmp_path / "train" / str(code) / f"{code}.jpg")
    dataset = data.ImageFolderDataset(tmp_path, layout="affectnet", split="train")
    assert class_of(dataset) == {"0": "Neutral", "1": "Happiness", "2": "Sadness", "3": "Surprise", "4": "Fear",
                                 "5": "Disgust", "6": "Anger", "7": "Other"}


def test_rafdb_folders_are_remapped(tmp_path):
    for code in range(1, 8):
        write_image(tmp_path / str(code) / "x.jpg")
    dataset = data.ImageFolderDataset(tmp_path, layout="rafdb")
    assert class_of(dataset) == {"1": "Surprise", "2": "Fear", "3": "Disgust", "4": "Happiness", "5": "Sadness",
                                 "6": "Anger", "7": "Neutral"}


@pytest.mark.parametrize("aligned", [True, False])
def test_rafdb_list_file(tmp_path, aligned):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(
        "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 4\n\n")
    for name in ("train_00001", "train_00002", "test_0001"):
        write_image(tmp_path / "Image" / "aligned" / f"{name}_aligned.jpg" if aligned else
                    tmp_path / "Image" / "original" / f"{name}.jpg")
    train = data.ImageFolderDataset(tmp_path, layout="rafdb", split="train")
    assert [CLASSES[v] for v in train.labels] == ["Sadness", "Surprise"]
    assert Path(train.paths[0]).name == ("train_00001_aligned.jpg" if aligned else "train_00001.jpg")
    test = data.ImageFolderDataset(tmp_path, layout="rafdb", split="test")
    assert [CLASSES[v] for v in test.labels] == ["Happiness"] and test[0][0].shape == (3, 16, 20)
    assert len(data.ImageFolderDataset(tmp_path, layout="rafdb")) == 3


def test_image_set_errors_name_the_culprit(tmp_path):
    with pytest.raises(EmoError, match="nowhere does not exist"):
        data.ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "Anger").mkdir(parents=True)
    with pytest.raises(EmoError, match=r"empty.*no images found"):
        data.ImageFolderDataset(tmp_path / "empty")
    write_image(tmp_path / "odd" / "smile" / "a.jpg")
    with pytest.raises(EmoError, match=r"smile: folder name is not a class"):
        data.ImageFolderDataset(tmp_path / "odd")
    write_image(tmp_path / "broken" / "Anger" / "good.jpg")
    (tmp_path / "broken" / "Fear").mkdir()
    (tmp_path / "broken" / "Fear" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "broken" / "Fear" / "empty.png").write_bytes(b"")
    dataset = data.ImageFolderDataset(tmp_path / "broken")
    for index in range(1, 3):
        with pytest.raises(EmoError, match=r"Fear/(bad\.jpg|empty\.png) is not a readable image"):
            dataset[index]
    with pytest.raises(EmoError, match=r"broken .*has no samples of Neutral, Disgust, Happiness, Sadness, "
                                       r"Surprise, Other"):
        data.check_classes(dataset.labels, str(tmp_path / "broken"))
    with pytest.raises(EmoError, match="label 8 is outside 0..7"):
        data.ImageDataset(["a.jpg"], [8])
    (tmp_path / "raf" / "EmoLabel").mkdir(parents=True)
    (tmp_path / "raf" / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 9\n")
    with pytest.raises(EmoError, match=r"list_patition_label.txt line 1"):
        data.ImageFolderDataset(tmp_path / "raf", layout="rafdb")
    (tmp_path / "raf" / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 3\n")
    with pytest.raises(EmoError, match=r"1 images listed .* missing, e.g. .*train_00001.jpg"):
        data.ImageFolderDataset(tmp_path / "raf", layout="rafdb")


# -------------------------------------------------------------------------------- Aff-Wild2

def test_affwild2_frames_skip_ignored_and_missing(tmp_path):
    labels = [0, -1, 2, 3, 4, -1, 6, 7, 1, 1]
    write_annotation(tmp_path / "ann" / "vid.txt", labels)
    write_annotation(tmp_path / "ann" / "gone.txt", [1, 2])
    for frame in range(1, 11):
        if frame != 4:
            write_image(tmp_path / "crops" / "vid" / f"{frame:05d}.jpg")
    dataset = data.AffWild2Frames(tmp_path / "crops", tmp_path / "ann")
    assert dataset.frames == [("vid", f) for f in (1, 3, 5, 7, 8, 9, 10)]
    assert dataset.labels.tolist() == [0, 2, 4, 6, 7, 1, 1]
    assert dataset.videos_without_crops == ["gone"]
    assert dataset[1][0].shape == (3, 16, 20) and dataset[1][1] == 2


def test_affwild2_frames_per_video_spreads_evenly(tmp_path):
    write_annotation(tmp_path / "ann" / "long.txt", [3] * 100)
    write_annotation(tmp_path / "ann" / "short.txt", [5, 5])
    for video, n in (("long", 100), ("short", 2)):
        for frame in range(1, n + 1):
            (tmp_path / "crops" / video).mkdir(parents=True, exist_ok=True)
            (tmp_path / "crops" / video / f"{frame:05d}.jpg").write_bytes(b"")  # only names are listed
    dataset = data.AffWild2Frames(tmp_path / "crops", tmp_path / "ann", frames_per_video=4)
    assert dataset.frames == [("long", 13), ("long", 38), ("long", 63), ("long", 88), ("short", 1), ("short", 2)]


def test_affwild2_frames_on_the_synthetic_dataset(synth):
    annotations = synth / "annotations" / "EXPR_Recognition_Challenge" / "Train_Set"
    dataset = data.AffWild2Frames(synth / "cropped_aligned", annotations)
    assert len(dataset) > 0 and (dataset.labels >= 0).all()
    for (video, frame), path, label in zip(dataset.frames, dataset.paths, dataset.labels):
        assert Path(path).is_file() and data.read_annotation(annotations / f"{video}.txt")[frame - 1] == label
    quick = data.AffWild2Frames(synth / "cropped_aligned", annotations, frames_per_video=3)
    videos = {video for video, _ in dataset.frames}
    assert len(quick) == 3 * len(videos) and set(quick.frames) <= set(dataset.frames)


def test_read_annotation_errors(tmp_path):
    path = tmp_path / "a.txt"
    write_annotation(path, [0, -1, 7])
    assert data.read_annotation(path).tolist() == [0, -1, 7]
    for text, message in (("Neutral,Anger\n0\n", "first line must be the header"),
                          (data.ABAW_HEADER + "\n0\n8\n", "line 3: label 8 is outside -1..7"),
                          (data.ABAW_HEADER + "\nx\n", "line 2: expected a label"),
                          (data.ABAW_HEADER + "\n", "no frame labels")):
        path.write_text(text)
        with pytest.raises(EmoError, match=rf"a\.txt.*{message}"):
            data.read_annotation(path)
    with pytest.raises(EmoError, match="missing.txt does not exist"):
        data.read_annotation(tmp_path / "missing.txt")
    with pytest.raises(EmoError, match="crops does not exist"):
        data.AffWild2Frames(tmp_path / "crops", tmp_path)


# ---------------------------------------------------------------------------------- loaders

def test_loader_with_two_workers(synth):
    dataset = data.ImageFolderDataset(synth / "images", transform=data.eval_transform(size=32, resize=36))
    batches = list(data.make_loader(dataset, batch_size=5, train=True, workers=2))
    assert len(batches) == 3  # 16 images, the last partial batch dropped
    for images, labels in batches:
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (5,) and labels.dtype == torch.long
    assert [len(b[1]) for b in data.make_loader(dataset, batch_size=5, train=False, workers=0)] == [5, 5, 5, 1]
