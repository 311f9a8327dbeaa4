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


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in float32: (model, tokenizer)."""
    from checkpoint import load_model

    return load_model(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own LlamaForCausalLM loaded from the same GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    from checkpoint import default_checkpoint

    path = default_checkpoint()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
