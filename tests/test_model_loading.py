"""--model forms that need no network: a local folder, a hub id found in the local HF cache, dtype/device flags."""

import pytest
import torch

from sinkscope.errors import UsageError
from sinkscope.model import ModelLoadError, load_model, resolve_dtype, resolve_source
from sinkscope.testing import save_tiny_model


def test_local_folder(tmp_path):
    folder = save_tiny_model("qwen3", tmp_path / "m")
    lm = load_model(str(folder), dtype="fp32", device="cpu")
    assert lm.adapter.model_type == "qwen3" and lm.n_layers == 3 and lm.dtype == torch.float32


def test_hub_id_from_the_local_hf_cache_offline(tmp_path, monkeypatch):
    """A hub id is resolved through huggingface_hub's cache layout: models--org--name/snapshots/<rev>/."""
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    rev = "0" * 40
    save_tiny_model("llama", repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_source("someorg/tiny-llama") == "someorg/tiny-llama"
    lm = load_model("someorg/tiny-llama", dtype="fp32", device="cpu")
    assert lm.adapter.model_type == "llama" and lm.source == "someorg/tiny-llama"
    with pytest.raises(ModelLoadError, match="someorg/absent.*not in the local cache"):
        load_model("someorg/absent", device="cpu")


def test_dtype_and_device_flags(tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "g")
    lm = load_model(str(folder), dtype="bf16", device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(UsageError, match="--device must be"):
        load_model(str(folder), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load_model(str(folder), device="cuda:0")
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_source("./no/such/folder")
