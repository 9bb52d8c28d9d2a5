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


# -- issue 9: the attention implementation under default flags; issue 11: broken model files ----------------------

def test_auto_attention_uses_sdpa_where_supported_and_eager_otherwise(tmp_path):
    """Gemma 2 refuses SDPA: under the default ("auto") it loads with eager attention, and says so."""
    gemma2 = load_model(str(save_tiny_model("gemma2", tmp_path / "g2")), device="cpu")
    llama = load_model(str(save_tiny_model("llama", tmp_path / "ll")), device="cpu")
    assert gemma2.attn_implementation == "eager" and llama.attn_implementation == "sdpa"
    assert load_model(str(tmp_path / "ll"), device="cpu", attn_implementation="eager").attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match=r"g2'.*--attn-impl sdpa.*does not support") as err:
        load_model(str(tmp_path / "g2"), device="cpu", attn_implementation="sdpa")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--attn-impl must be"):
        load_model(str(tmp_path / "ll"), device="cpu", attn_implementation="flash")


def test_multimodal_gemma3_folder_loads_with_the_gemma3_row(tmp_path):
    """AutoModelForCausalLM gives Gemma3ForConditionalGeneration for a Gemma 3 folder with a vision tower; the
    top-level `gemma3` row (text tower below model.language_model) must be used, not gemma3_text's."""
    from sinkscope.capture import Capture
    from sinkscope.promptset import make_batches, tokenize
    lm = load_model(str(save_tiny_model("gemma3", tmp_path / "g3")), device="cpu")
    assert type(lm.model).__name__ == "Gemma3ForConditionalGeneration"
    assert lm.adapter.model_type == "gemma3" and lm.n_layers == 3 and lm.config.model_type == "gemma3_text"
    batch = make_batches(tokenize(lm.tokenizer, ["a prompt about sinks", "another one"]), batch_size=2)[0]
    with Capture(lm, {"hook_resid_post": None, "attn.hook_pattern": [0]}) as cap:
        c = cap.forward(batch)
    with torch.no_grad():
        hs = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      output_hidden_states=True).hidden_states
    torch.testing.assert_close(c["blocks.1.hook_resid_post"], hs[2].float())
    assert c["blocks.2.attn.hook_pattern"].shape[:2] == (2, lm.config.num_attention_heads)


def _cli_error(args, capsys) -> str:
    from sinkscope.cli import main
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.startswith("sinkscope: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def cli_args(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a prompt that is long enough for every token\n", encoding="utf-8")
    return ["--decompose-output", "--layer", "1", "--prompt-file", str(prompts), "--outdir", str(tmp_path / "o"),
            "--no-progress"]


def _builtin_gguf_bytes(n: int) -> bytes:
    from sinkscope.model import builtin_gguf_path
    with open(builtin_gguf_path("smollm2-135m"), "rb") as f:
        return f.read(n)


def test_truncated_gguf_is_a_one_line_error(tmp_path, cli_args, capsys, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "cut.gguf"
    g.write_bytes(_builtin_gguf_bytes(2 << 20))  # the real header and metadata, then the tensors stop
    line = _cli_error(cli_args + ["--model", str(g)], capsys)
    assert str(g) in line and "GGUF" in line
    assert not any((tmp_path / "cache").glob("cut-*"))  # no half-converted model is left in the cache


def test_text_file_named_gguf_is_a_one_line_error(tmp_path, cli_args, capsys, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "notes.gguf"
    g.write_text("this is not a model\n", encoding="utf-8")
    line = _cli_error(cli_args + ["--model", str(g)], capsys)
    assert str(g) in line and "not a GGUF file" in line


def test_truncated_safetensors_is_a_one_line_error(tmp_path, cli_args, capsys):
    folder = save_tiny_model("llama", tmp_path / "m")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    line = _cli_error(cli_args + ["--model", str(folder)], capsys)
    assert str(folder) in line and "weights" in line


def test_folder_without_tokenizer_files_is_a_one_line_error(tmp_path, cli_args, capsys):
    folder = save_tiny_model("llama", tmp_path / "m")
    for p in folder.iterdir():
        if p.name not in ("config.json", "generation_config.json", "model.safetensors"):
            p.unlink()
    assert (folder / "model.safetensors").is_file()
    line = _cli_error(cli_args + ["--model", str(folder)], capsys)
    assert str(folder) in line and "tokenizer" in line
