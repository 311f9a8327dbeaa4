"""The `tiny` draft (tiny.py): its storage, its sharing of the target's embedding, its shapes, and that
it actually predicts the target (far better than chance and than an untrained early exit)."""

import pytest
import torch

from model import ModelArgs, Transformer
from tiny import ARTIFACT, dequantize_delta, load_tiny, quantize_delta, student_from_target


@pytest.mark.parametrize("bits", [4, 8])
def test_delta_quantization_round_trip(bits):
    d = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    d[3, :32] = 0.0  # an all-zero group must come back as zeros, not NaN
    back = dequantize_delta(quantize_delta(d, bits))
    assert back.shape == d.shape and torch.isfinite(back).all()
    assert torch.equal(back[3, :32], torch.zeros(32))
    # Symmetric rounding: each element is off by at most half a step (amax / qmax / 2) of its group,
    # plus the fp16 rounding of the scale.
    step = d.view(96, 4, 32).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    err = (back - d).view(96, 4, 32).abs()
    assert (err <= step * 0.5 * 1.01 + 1e-6).all()


def test_artifact_is_small():
    assert ARTIFACT.exists(), "run scripts/distill_tiny.py to produce the tiny draft"
    assert ARTIFACT.stat().st_size < 10 * 2**20


def test_load_tiny_refuses_another_target():
    other = Transformer(ModelArgs(vocab_size=256, n_layer=2, n_head=4, dim=64, intermediate_size=128))
    with pytest.raises(ValueError, match="trained for a target"):
        load_tiny(other)


@pytest.fixture(scope="module")
def tiny(smollm2):
    return load_tiny(smollm2[0])


@pytest.mark.slow
def test_tiny_shares_the_embedding_and_keeps_the_vocabulary(smollm2, tiny):
    target, _ = smollm2
    assert tiny.tok_embeddings.weight is target.tok_embeddings.weight  # shared, not copied
    assert tiny.config.vocab_size == target.config.vocab_size
    assert 1 <= tiny.config.n_layer <= target.config.n_layer // 4
    assert not any(p.requires_grad for p in tiny.parameters())
    # Loading the draft never touches the target's own weights.
    assert all(a is not b for a, b in zip(tiny.layers.parameters(), target.layers.parameters()))


@pytest.mark.slow
def test_tiny_forward_shapes_and_cache(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(ids)
        assert full.shape == (2, 12, tiny.config.vocab_size)
        # Outside the head's subset the draft's probability is exactly 0; inside, logits are finite.
        finite = torch.isfinite(full)
        assert finite[..., tiny.output.ids].all()
        assert finite.sum(-1).eq(tiny.output.ids.numel()).all()
        assert torch.softmax(full, -1).sum(-1).sub(1).abs().max() < 1e-5
        # A cached forward (T tokens, then single steps) gives the same logits as the uncached one.
        tiny.setup_caches(1, 32)
        a = tiny(ids[:1, :8], torch.arange(8))
        b = torch.cat([tiny(ids[:1, i : i + 1], torch.tensor([i])) for i in range(8, 12)], dim=1)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full[:1], atol=1e-4, rtol=1e-4)


# Chat answers in the target's style, written by hand: teacher-forcing fixed text costs one forward per
# model, where generating the target's own answer would cost one target step per token.
CHATS = [
    (
        "Why do leaves change colour in autumn?",
        "Leaves change colour in autumn because the days get shorter and the temperature drops. Trees "
        "stop making chlorophyll, the green pigment that helps them absorb sunlight. As the chlorophyll "
        "breaks down, other pigments such as carotenoids become visible, giving the leaves their yellow "
        "and orange colours.",
    ),
    (
        "Write a Python function that adds two numbers.",
        "Here is a simple Python function that adds two numbers:\n\n```python\ndef add_numbers(a, b):\n"
        "    return a + b\n```\n\nYou can use it like this:\n\n```python\nresult = add_numbers(3, 5)\n"
        "print(result)  # Output: 8\n```",
    ),
]


@pytest.mark.slow
def test_tiny_predicts_the_target(smollm2, tiny):
    """Teacher-forced on chat answers, the draft's argmax equals the target's far more often than chance
    (1 in 49152), and more often than the untrained early exit of the same depth (the first n layers
    of the target with its final norm and head)."""
    target, tok = smollm2
    early = student_from_target(target, list(range(tiny.config.n_layer)), None)
    hits = hits_early = total = 0
    with torch.no_grad():
        for prompt, answer in CHATS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}])
            n_prompt = len(tok.encode(text, bos=tok.add_bos))
            seq = torch.tensor([tok.encode(text + answer, bos=tok.add_bos)])
            # Positions from the last prompt token on: the predictions of the answer's tokens.
            want = target(seq)[0, n_prompt - 1 : -1].argmax(-1)
            hits += int((tiny(seq)[0, n_prompt - 1 : -1].argmax(-1) == want).sum())
            hits_early += int((early(seq)[0, n_prompt - 1 : -1].argmax(-1) == want).sum())
            total += want.numel()
    assert hits / total > 0.25, f"tiny draft agrees with the target on {hits}/{total} tokens"
    assert hits > 2 * hits_early, f"tiny {hits}/{total} vs untrained early exit {hits_early}/{total}"
