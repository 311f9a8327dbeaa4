"""The network against transformers' LlamaForCausalLM, and the static KV cache's promises."""

import json

import pytest
import torch

from checkpoint import CheckpointError, load_model, read_checkpoint
from model import PRESETS, ModelArgs, Transformer, rope_table, weight_bytes

# fp32 logits of two implementations of the same maths differ by summation order only:
# ~1e-6 relative on these small models; 1e-4 absolute leaves room without hiding real bugs
# (a wrong RoPE layout or a missing norm changes logits by O(1)).
ATOL = 1e-4


def hf_llama(tmp_path, tie=False, rope_scaling=None, shard=False, **overrides):
    """A randomly initialised HF Llama saved as safetensors in tmp_path (the real loader's input)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )  # fmt: skip
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    cfg.update(overrides)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a misplaced norm shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "5GB")
    return hf


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(tie=True),
        dict(shard=True),
        dict(
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ],
    ids=["plain", "tied", "sharded", "llama3-rope"],
)  # fmt: skip
def test_logits_equal_transformers_safetensors(tmp_path, variant):
    hf = hf_llama(tmp_path, **variant)
    if variant.get("shard"):
        assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_model(tmp_path)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (2, 40, 96)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_logits_equal_transformers_gguf(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. 12345 <|im_end|>")])
    with torch.no_grad():
        ours, ref = model(ids), hf_smollm2(ids).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def small_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(
        **{**dict(block_size=64, vocab_size=50, n_layer=2, n_head=4, n_local_heads=2, dim=32), **kw}
    )
    m = Transformer(args).to(dtype).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("offset,chunk", [(0, 7), (5, 3), (11, 1), (3, 16)])
def test_cached_chunk_equals_single_steps_and_full_forward(offset, chunk):
    m = small_model()
    ids = torch.randint(0, 50, (1, offset + chunk), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        m.setup_caches(1, 48)
        if offset:
            m(ids[:, :offset], torch.arange(offset))
        chunked = m(ids[:, offset:], torch.arange(offset, offset + chunk))
        m.setup_caches(1, 48)
        steps = torch.cat([m(ids[:, i : i + 1], torch.tensor([i])) for i in range(offset + chunk)], 1)
    torch.testing.assert_close(chunked, full[:, offset:], atol=1e-10, rtol=0)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=0)


def test_stale_cache_entries_are_overwritten_after_rejection():
    """A verification writes k drafted tokens; only some are accepted. The next forward starts at the
    first rejected position and must give the logits of a clean run, without any rollback."""
    m = small_model()
    g = torch.Generator().manual_seed(3)
    prefix, drafted, actual = (torch.randint(0, 50, (1, n), generator=g) for n in (10, 6, 6))
    with torch.no_grad():
        m.setup_caches(1, 48)
        m(prefix, torch.arange(10))
        m(drafted, torch.arange(10, 16))  # positions 10..15 now hold a rejected draft
        accepted = 2
        seq = torch.cat([prefix, drafted[:, :accepted], actual], 1)
        got = m(seq[:, 10 + accepted :], torch.arange(10 + accepted, seq.shape[1]))
        ref = small_model()(seq)[:, 10 + accepted :]  # the same weights, no cache at all
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_explicit_mask_replaces_causal_mask():
    """The mask argument is the hook tree drafts will use: passing the causal mask explicitly
    changes nothing, and hiding a slot changes the result."""
    m = small_model()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        m.setup_caches(1, 16)
        pos = torch.arange(8)
        a = m(ids, pos)
        b = m(ids, pos, mask=m.causal_mask[pos])
        mask = m.causal_mask[pos].clone()
        mask[5:, 2] = False
        c = m(ids, pos, mask=mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (c[0, 5:] - a[0, 5:]).abs().max() > 1e-6
    torch.testing.assert_close(c[0, :5], a[0, :5], atol=0, rtol=0)


def test_presets_build_and_have_the_published_sizes():
    # Parameter counts of the real models (embeddings included, tied counted once).
    expected = {
        "smollm2-135m": 134.5e6,
        "llama-3.2-1b": 1.236e9,
        "llama-3.1-8b": 8.03e9,
        "llama-2-7b": 6.74e9,
    }
    for name, n in expected.items():
        with torch.device("meta"):
            m = Transformer(ModelArgs.from_name(name))
        count = sum(p.numel() for p in m.parameters())
        assert abs(count - n) / n < 0.01, (name, count)
    assert set(expected) | {"llama-3.1-70b"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.from_name("gpt-5")


def test_llama31_rope_scaling_changes_only_low_frequencies():
    base = ModelArgs.from_name("llama-3.1-8b")
    plain = ModelArgs(**{**PRESETS["llama-3.1-8b"], "rope_scaling": None})
    # Angles at position 1 are the frequencies themselves.
    a, b = (torch.atan2(t[1, :, 1], t[1, :, 0]) for t in (rope_table(base, 2), rope_table(plain, 2)))
    torch.testing.assert_close(a[:16], b[:16])  # high frequencies untouched
    torch.testing.assert_close(a[-8:], b[-8:] / 8.0)  # the lowest ones slowed down by the factor


def test_setup_caches_rejects_length_past_context():
    m = small_model()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m.setup_caches(1, 65)
    with pytest.raises(RuntimeError, match="setup_caches"):
        small_model()(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))


def test_weight_bytes_counts_tied_head_once():
    m = small_model(dtype=torch.float32, tie_embeddings=True)
    n = sum(p.numel() for p in m.parameters()) * 4
    assert weight_bytes(m) == n
    m = small_model(dtype=torch.float32)
    total = sum(p.numel() for p in m.parameters()) * 4
    assert weight_bytes(m) == total - 50 * 32 * 4  # untied: the head is read, the embedding is not


def test_clear_errors_for_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        read_checkpoint(bad)
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_checkpoint(tmp_path / "x.bin")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_checkpoint(tmp_path / "junk.gguf")


def test_mismatched_config_is_a_clear_error(tmp_path):
    hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(tmp_path)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path)
