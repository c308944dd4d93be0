"""Stage II per-frame features: the fast video path, stride, audio, two people, the feature files and
their cache, sharding, the Stage I encoder round trip and the cropped_aligned variant.

Real faces come from the astronaut photograph (conftest's `detector` finds them); the encoder is a tiny
random DINOv2 with a MoE head, the audio model a tiny random wav2vec2."""
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import emo
import hf_checkpoints as hf
from models import CLASSES, EmoError, save_checkpoint
from models import EmotionClassifier, MoEHead, ViT, Wav2Vec2

SIDE, FPS = 160, 25
NO_FACE = range(12, 16)  # blank frames in the face video
CFG = data.FeatureConfig(crop_size=56, crop_resize=64, batch_frames=5, decode_batch=6,
                         track=data.TrackConfig(fill_gap=1))


def astronaut(side):
    from skimage.data import astronaut as photo
    return np.asarray(Image.fromarray(photo()).resize((side, side), Image.BILINEAR))


def face_frames(n=24, blank=NO_FACE):
    image = astronaut(2 * SIDE)[SIDE // 4: SIDE // 4 + SIDE, SIDE // 2: SIDE // 2 + SIDE]  # the face, ~60 px
    frames = np.stack([np.roll(image, (2 * i, i), axis=(0, 1)) for i in range(n)])
    frames[list(blank)] = 100
    return frames


def tone(seconds, frequency=440.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, detector):
    root = tmp_path_factory.mktemp("features")
    videos = root / "videos"
    (videos / "batch1").mkdir(parents=True)
    (videos / "batch2").mkdir()
    frames = face_frames()
    data.write_video(videos / "batch1" / "talk.mp4", frames, FPS, tone(len(frames) / FPS), 16000, "mp4")
    data.write_video(videos / "batch2" / "silent.mp4", frames[:10], FPS, None, 16000, "mp4")
    left = np.ascontiguousarray(frames[:10, :, ::-1])  # two people: a mirrored copy on the left
    pair = np.concatenate([left, np.full_like(left[:, :, :32], 100), frames[:10]], axis=2)
    data.write_video(videos / "batch2" / "pair.mp4", pair, FPS, tone(0.4, 300.0), 16000, "mp4")
    data.write_video(videos / "batch1" / "empty.mp4", np.full((8, 96, 96, 3), 90, np.uint8), FPS, None, 16000, "mp4")

    torch.manual_seed(0)
    backbone = hf.save(hf.dinov2(), root / "dinov2")
    model = EmotionClassifier(ViT.from_pretrained(backbone), MoEHead(64, len(CLASSES))).eval()
    config = {"config": {"backbone": str(backbone), "revision": None, "head": "moe"}, "epoch": 1, "metrics": {}}
    save_checkpoint(root / "stage1" / "best", model.state_dict(), config)
    w2v_dir = hf.save(hf.wav2vec2(**hf.TINY_W2V_LARGE), root / "w2v")
    w2v = Wav2Vec2.from_pretrained(w2v_dir)
    return dict(root=root, videos=videos, model=model, w2v=w2v, w2v_dir=w2v_dir, cache=root / "faces",
                stage1=root / "stage1", detector=detector)


def features(setup, name, person="largest", cfg=CFG, w2v=True):
    return data.video_features(setup["videos"] / name, setup["model"], setup["w2v"] if w2v else None,
                               setup["detector"], person, cfg, cache_dir=setup["cache"], progress=False)


def direct_features(model, path, boxes, cfg=CFG):
    """What the encoder gives on the crops of the frames with a box, made the plain way: all frames decoded,
    then cropped (the colour conversion of the crops' regions only is checked in test_media)."""
    frames, size, rotation = [], None, 0
    for decoded, _, size, rotation in data.iter_decoded(path):
        frames += decoded
    known = torch.nonzero(~boxes.isnan().any(1)).flatten()
    crops = data.crop_decoded([frames[i] for i in known.tolist()], boxes[known], size, rotation, cfg.scales,
                              cfg.crop_size, cfg.crop_resize)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 1, 3, 1, 1)
    with torch.inference_mode():
        encoded = model.features(((crops - mean) / std).flatten(0, 1)).view(len(known), len(cfg.scales), -1)
    return known, encoded.mean(1)


def test_one_row_per_frame_and_the_scale_average(setup):
    result = features(setup, "batch1/talk.mp4")
    n = 24
    assert len(result) == n and result.visual.shape == (n, 64) and result.audio.shape == (n, 64)
    assert torch.allclose(result.times, torch.arange(n, dtype=torch.float64) / FPS, atol=1e-3)
    assert result.face.tolist() == [f not in NO_FACE for f in range(n)]  # a 4-frame gap: longer than fill_gap 1
    assert torch.equal(result.detected, result.face)
    assert result.boxes[~result.face].isnan().all() and not result.boxes[result.face].isnan().any()
    known, expected = direct_features(setup["model"], setup["videos"] / "batch1/talk.mp4", result.boxes)
    assert known.tolist() == torch.nonzero(result.face).flatten().tolist()
    assert (result.visual[known] - expected).abs().max() <= 1e-5
    assert torch.equal(result.visual[13], result.visual[11]) and torch.equal(result.visual[14], result.visual[16])
    assert result.audio_present.all() and result.audio.abs().sum(1).gt(0).all()
    assert not torch.equal(result.audio[0], result.audio[-1])


def test_stride_encodes_some_frames_and_interpolates_the_rest(setup):
    every = features(setup, "batch1/talk.mp4")
    strided = features(setup, "batch1/talk.mp4", cfg=data.FeatureConfig(**{**asdict(CFG), "stride": 2}))
    plan = data.encode_plan(every.face, 2)
    # runs of face frames 0..11 and 16..23: every 2nd frame of each and each run's last
    assert torch.nonzero(plan).flatten().tolist() == [0, 2, 4, 6, 8, 10, 11, 16, 18, 20, 22, 23]
    assert (strided.visual[plan] - every.visual[plan]).abs().max() <= 1e-5
    for f in [1, 3, 5, 7, 9, 17, 19, 21]:
        assert torch.allclose(strided.visual[f], (strided.visual[f - 1] + strided.visual[f + 1]) / 2, atol=1e-6)
    assert torch.equal(strided.visual[13], strided.visual[11]) and torch.equal(strided.visual[14], strided.visual[16])
    assert torch.equal(strided.face, every.face) and torch.equal(strided.audio, every.audio)


def test_interpolation_and_fill_rules():
    face = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    plan = data.encode_plan(face, 3)
    assert torch.nonzero(plan).flatten().tolist() == [1, 4, 8, 9]
    values = torch.zeros(10, 1)
    values[plan] = torch.tensor([[1.0], [4.0], [8.0], [9.0]])
    data.fill_rows(values, plan, face)
    assert values.flatten().tolist() == [1, 1, 2, 3, 4, 4, 4, 8, 8, 9]  # frame 6: ties take the earlier face


def test_silent_video_and_no_audio_model(setup):
    silent = features(setup, "batch2/silent.mp4")
    assert len(silent) == 10 and not silent.audio_present.any() and not silent.audio.any()
    assert silent.audio.shape == (10, 64) and silent.face.all()
    without = features(setup, "batch1/talk.mp4", w2v=False)
    assert without.audio.shape == (24, 1024) and not without.audio.any() and not without.audio_present.any()


def test_video_without_a_face(setup):
    result = features(setup, "batch1/empty.mp4")
    assert len(result) == 8 and not result.face.any() and not result.visual.any() and result.boxes.isnan().all()
    with pytest.raises(EmoError, match="unknown person 'all'"):
        features(setup, "batch1/empty.mp4", person="all")


def test_two_people_share_the_audio(setup):
    both = data.people_features(setup["videos"] / "batch2/pair.mp4", setup["model"], setup["w2v"], setup["detector"],
                                ("left", "right"), CFG, cache_dir=setup["cache"], progress=False)
    left, right = both["left"], both["right"]
    assert left.face.all() and right.face.all()
    middle = SIDE + 16
    assert ((left.boxes[:, 0] + left.boxes[:, 2]) / 2 < middle).all()
    assert ((right.boxes[:, 0] + right.boxes[:, 2]) / 2 > middle).all()
    assert torch.equal(left.audio, right.audio) and left.audio_present.all()
    assert not torch.allclose(left.visual, right.visual)
    alone = features(setup, "batch2/pair.mp4", person="right")
    assert (alone.visual - right.visual).abs().max() <= 1e-5 and torch.equal(alone.boxes, right.boxes)


def boxes_json(boxes_per_key):
    return {"boxes": {key: [None if b.isnan().any() else b.tolist() for b in boxes]
                      for key, boxes in boxes_per_key.items()}}


def test_your_own_boxes_instead_of_the_detector(setup, tmp_path):
    """Boxes from a file give what the detector's boxes give; the file is checked with clear errors."""
    talk = features(setup, "batch1/talk.mp4")
    file = tmp_path / "talk.json"
    file.write_text(json.dumps(boxes_json({"talk": talk.boxes})))
    own = data.video_features(setup["videos"] / "batch1/talk.mp4", setup["model"], setup["w2v"], None, cfg=CFG,
                              progress=False, boxes=file)
    assert torch.equal(own.face, talk.face) and torch.equal(own.times, talk.times)
    assert (own.visual - talk.visual).abs().max() <= 1e-5 and torch.equal(own.audio, talk.audio)

    pair = data.people_features(setup["videos"] / "batch2/pair.mp4", setup["model"], None, setup["detector"],
                                ("left", "right"), CFG, cache_dir=setup["cache"], progress=False)
    given = {"left": pair["left"].boxes, "right": pair["right"].boxes}
    own = data.people_features(setup["videos"] / "batch2/pair.mp4", setup["model"], None, None, ("right", "largest"),
                               CFG, progress=False, boxes=given)
    assert (own["right"].visual - pair["right"].visual).abs().max() <= 1e-5
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    larger = torch.where((area(given["left"]) >= area(given["right"]))[:, None], given["left"], given["right"])
    assert torch.equal(own["largest"].boxes, larger)  # largest, when not given: the larger box of each frame

    def error(content, person="largest"):
        file.write_text(json.dumps(content))
        with pytest.raises(EmoError) as raised:
            data.video_features(setup["videos"] / "batch1/talk.mp4", setup["model"], None, None, person, CFG,
                                progress=False, boxes=file)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "one box (or null) per frame" in error(boxes_json({"talk": talk.boxes[:-1]}))
    assert "x2 > x1" in error({"boxes": {"talk": [[10, 10, 5, 20]] * len(talk)}})
    assert "[x1, y1, x2, y2] or null" in error({"boxes": {"talk": [[1, 2, 3]] * len(talk)}})
    assert "no boxes for the left person" in error(boxes_json({"talk": talk.boxes}), person="left")
    assert "expected" in error({"frames": 3})
    with pytest.raises(EmoError, match="need a face detector"):
        data.video_features(setup["videos"] / "batch1/talk.mp4", setup["model"], None, None, cfg=CFG)


def test_extract_with_a_folder_of_boxes_files(setup, tmp_path):
    pair = data.people_features(setup["videos"] / "batch2/pair.mp4", setup["model"], None, setup["detector"],
                                ("left", "right"), CFG, cache_dir=setup["cache"], progress=False)
    folder = tmp_path / "boxes"
    folder.mkdir()
    (folder / "pair.json").write_text(json.dumps(boxes_json({"pair_left": pair["left"].boxes,
                                                             "pair_right": pair["right"].boxes})))
    videos = data.find_videos(setup["videos"])

    def extract():
        return data.extract_features(["pair_left", "pair_right"], videos, tmp_path / "features", setup["model"],
                                     None, None, CFG, boxes=folder, progress=False)

    first = extract()
    assert sorted(first["written"]) == ["pair_left", "pair_right"]
    right = data.load_features(first["paths"]["pair_right"])
    assert torch.equal(right.boxes, pair["right"].boxes)
    assert (right.visual - pair["right"].visual).abs().max() <= 1e-2  # stored in fp16
    assert extract()["written"] == []
    (folder / "pair.json").write_text((folder / "pair.json").read_text() + " ")
    assert sorted(extract()["written"]) == ["pair_left", "pair_right"]  # the boxes file changed
    with pytest.raises(EmoError, match="no boxes file"):
        data.extract_features(["talk"], videos, tmp_path / "features", setup["model"], None, None, CFG, boxes=folder)


def test_save_and_load(setup, tmp_path, capsys):
    result = features(setup, "batch1/talk.mp4")
    path = tmp_path / "talk.features.safetensors"
    data.save_features(path, result, {"a": 1})
    loaded = data.load_features(path, {"a": 1})
    assert loaded.visual.dtype == torch.float32 and (loaded.visual - result.visual).abs().max() < 1e-2
    assert torch.equal(loaded.face, result.face) and torch.equal(loaded.times, result.times)
    assert torch.equal(loaded.boxes.isnan(), result.boxes.isnan())
    assert data.load_features(path) is not None and data.load_features(path, {"a": 2}) is None
    assert data.load_features(tmp_path / "missing.features.safetensors") is None
    path.write_bytes(path.read_bytes()[:1000])
    assert data.load_features(path, {"a": 1}) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err and str(path) in err


def test_extract_reuses_and_rebuilds(setup, tmp_path, monkeypatch, capsys):
    videos = data.find_videos(setup["videos"])
    assert set(videos) == {"talk", "silent", "pair", "empty"}
    ids = ["talk", "silent", "pair_left", "pair_right"]
    calls = []
    original = data.people_features
    monkeypatch.setattr(data, "people_features", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    out = tmp_path / "features"

    def extract(cfg=CFG, **kwargs):
        return data.extract_features(ids, videos, out, setup["stage1"], setup["w2v_dir"], setup["detector"], cfg,
                                     cache_dir=setup["cache"], progress=False, **kwargs)

    first = extract()
    assert sorted(first["written"]) == sorted(ids) and not first["skipped"] and len(calls) == 3  # pair decoded once
    stamps = {i: first["paths"][i].stat().st_mtime_ns for i in ids}
    pair = data.load_features(first["paths"]["pair_left"])
    assert len(pair) == 10 and pair.audio_present.all()

    again = extract()
    assert sorted(again["skipped"]) == sorted(ids) and len(calls) == 3
    assert stamps == {i: again["paths"][i].stat().st_mtime_ns for i in ids}

    stat = (setup["videos"] / "batch2/silent.mp4").stat()
    os.utime(setup["videos"] / "batch2/silent.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert extract()["written"] == ["silent"]                                 # the video changed
    first["paths"]["talk"].write_bytes(b"garbage")
    assert extract()["written"] == ["talk"]                                   # a damaged file
    assert "unreadable" in capsys.readouterr().err
    changed = extract(data.FeatureConfig(**{**asdict(CFG), "scales": (1.2,)}))
    assert sorted(changed["written"]) == sorted(ids)                          # other settings
    assert extract(data.FeatureConfig(**{**asdict(CFG), "scales": (1.2,), "batch_frames": 7}))["written"] == []
    with pytest.raises(EmoError, match="no video for annotation id nobody"):
        data.extract_features(["nobody"], videos, out, setup["stage1"], None, setup["detector"], CFG)


def test_ranks_share_the_ids(setup, tmp_path, monkeypatch):
    videos = data.find_videos(setup["videos"])
    ids = ["empty", "pair_left", "pair_right", "silent", "talk"]
    monkeypatch.setattr(data, "people_features", lambda video, *a, **k: {p: None for p in a[3]})
    monkeypatch.setattr(data, "save_features", lambda path, *a: Path(path).write_text("x"))
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = data.extract_features(ids, videos, tmp_path, setup["model"], None, setup["detector"], CFG,
                                       progress=False)
        shares.append(result["written"])
    assert sorted(shares[0] + shares[1]) == ids and not set(shares[0]) & set(shares[1])
    assert all(s for s in shares)
    assert any({"pair_left", "pair_right"} <= set(s) for s in shares)  # one video, one rank


def test_encoder_round_trip(setup):
    for where in (setup["stage1"], setup["stage1"] / "best"):
        loaded = data.load_encoder(where, "cpu")
        assert not loaded.training
        state, original = loaded.state_dict(), setup["model"].state_dict()
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    result = data.video_features(setup["videos"] / "batch2/silent.mp4", loaded, None, setup["detector"], cfg=CFG,
                                 cache_dir=setup["cache"], progress=False)
    assert torch.equal(result.visual, features(setup, "batch2/silent.mp4").visual)
    with pytest.raises(EmoError, match="not a Stage I checkpoint"):
        data.load_encoder(setup["root"], "cpu")


def test_encoder_needs_only_the_backbone_config(setup, tmp_path):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "config.json").write_bytes((setup["root"] / "dinov2" / "config.json").read_bytes())
    config = {"config": {"backbone": str(tmp_path / "backbone"), "head": "moe"}, "epoch": 1}
    save_checkpoint(tmp_path / "run" / "last", setup["model"].state_dict(), config)
    loaded = data.load_encoder(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), setup["model"].state_dict().values()))


def test_cropped_aligned_variant(setup, tmp_path):
    manifest = emo.synthesize(emo.SynthConfig(out=str(tmp_path / "synth"), videos=4, frames=40, width=96,
                                                height=72, images=0))
    synth = tmp_path / "synth"
    ids = [i for split in manifest["splits"].values() for i in split][:2]
    videos = data.find_videos(synth / "videos")
    annotations = synth / "annotations" / "EXPR_Recognition_Challenge"
    folders = {i: next(annotations.glob(f"*/{i}.txt")).parent for i in ids}
    assert len(set(folders.values())) <= 2
    results = {}
    for folder in set(folders.values()):
        mine = [i for i in ids if folders[i] == folder]
        written = data.extract_features(mine, videos, tmp_path / "out", setup["model"], setup["w2v"], None, CFG,
                                        cropped_aligned=synth / "cropped_aligned", annotation_dir=folder,
                                        progress=False)
        results.update({i: data.load_features(p) for i, p in written["paths"].items()})
    transform = data.eval_transform(CFG.crop_size, CFG.crop_resize)
    for i in ids:
        n = len(data.read_annotation(folders[i] / f"{i}.txt"))
        jpgs = {int(p.stem) - 1 for p in (synth / "cropped_aligned" / i).glob("*.jpg")}
        result = results[i]
        assert len(result) == n and result.face.tolist() == [f in jpgs for f in range(n)]
        assert 0 < len(jpgs) < n  # some crops are missing
        first = min(jpgs)
        with torch.inference_mode():
            expected = setup["model"].features(transform(data.read_image(
                synth / "cropped_aligned" / i / f"{first + 1:05d}.jpg"))[None])[0]
        assert (result.visual[first] - expected).abs().max() < 1e-2  # stored as fp16
        missing = next(f for f in range(n) if f not in jpgs)
        nearest = min(jpgs, key=lambda f: (abs(f - missing), f))
        assert torch.equal(result.visual[missing], result.visual[nearest])
        has_audio = next(r for r in manifest["videos"] if i in r["ids"])["audio"]
        assert bool(result.audio_present.all()) == has_audio


def test_video_for_id(tmp_path):
    videos = {"a": Path("a.mp4"), "b_left": Path("b_left.mp4"), "c": Path("c.avi")}
    assert data.video_for_id("a", videos) == (Path("a.mp4"), "largest")
    assert data.video_for_id("c_right", videos) == (Path("c.avi"), "right")
    assert data.video_for_id("b_left", videos) == (Path("b_left.mp4"), "largest")
    with pytest.raises(EmoError, match="no video for annotation id d_left"):
        data.video_for_id("d_left", videos)
    (tmp_path / "x").mkdir()
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "x" / "a.avi").write_bytes(b"")
    with pytest.raises(EmoError, match="two videos named a"):
        data.find_videos(tmp_path)
    with pytest.raises(EmoError, match="does not exist"):
        data.find_videos(tmp_path / "nowhere")
    (tmp_path / "x" / "a.avi").unlink()
    for name in ("b.MPG", "c.ts", "d.wmv", "notes.txt"):  # every suffix infer.py takes, train.py takes too
        (tmp_path / "x" / name).write_bytes(b"")
    assert sorted(data.find_videos(tmp_path)) == ["a", "b", "c", "d"]


def test_config_round_trips_through_json():
    cfg = data.FeatureConfig(scales=(1.2,), stride=3, detect=data.DetectConfig(min_size=20), batch_frames=7)
    again = data.FeatureConfig(**json.loads(json.dumps(asdict(cfg))))
    assert again == cfg and again.key() == cfg.key() and isinstance(again.track, data.TrackConfig)
    assert "batch_frames" not in cfg.key() and "batch_size" not in cfg.key()["detect"]
    with pytest.raises(EmoError, match="stride"):
        data.FeatureConfig(stride=0)


def test_prefetch_stops_early_and_passes_errors_on():
    closed = []

    def numbers():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    taken = []
    for n in data._prefetch(numbers()):
        taken.append(n)
        if n == 3:
            break
    assert taken == [0, 1, 2, 3] and closed == [True]

    def broken():
        yield 1
        raise EmoError("the file broke")

    with pytest.raises(EmoError, match="the file broke"):
        list(data._prefetch(broken()))


def test_each_video_is_decoded_once(setup, monkeypatch, tmp_path):
    passes = []
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *args: passes.append(args[2]) or decode(*args))
    video = setup["videos"] / "batch2" / "pair.mp4"
    found = data.people_features(video, setup["model"], setup["w2v"], setup["detector"], ("left", "right"), CFG,
                                 cache_dir=tmp_path / "faces", progress=False)
    assert len(passes) == 1 and len(found["left"]) == len(found["right"]) == 10
    boxes = {"left": found["left"].boxes, "right": found["right"].boxes}
    again = data.people_features(video, setup["model"], setup["w2v"], None, ("left", "right"), CFG, boxes=boxes,
                                 progress=False)
    assert len(passes) == 2  # the user's own boxes: one pass too
    for person in ("left", "right"):
        assert (again[person].visual - found[person].visual).abs().max() <= 1e-5  # batched differently
