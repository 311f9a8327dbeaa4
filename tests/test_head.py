"""Feature heads (head.py) as levels: exactness, and the head's cache and features checked at every
forward against a no-cache recomputation. The heads here are random: exactness never depends on a
draft's quality."""

import copy
import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_speculate import (
    ALPHA,
    PROMPT,
    draft_pool,
    exact_sequence_probs,
    g_test,
    greedy_reference,
    level,
    sample_counts,
    tiny_model,
)

from head import FeatureHead, HeadLevel
from model import ModelArgs
from speculate import (
    ModelLevel,
    NgramProposer,
    Speculation,
    TreeShape,
    autoregressive_decode,
    speculative_decode,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@functools.cache
def random_head(seed: int, model) -> FeatureHead:
    """A random float64 head for `model` (a tiny_model), sharing its embedding and output head."""
    torch.manual_seed(100 + seed)
    c = model.config
    args = ModelArgs(
        block_size=c.block_size, vocab_size=c.vocab_size, n_layer=1, n_head=c.n_head, dim=c.dim,
        intermediate_size=24,
    )  # fmt: skip
    head = FeatureHead(args, model.tok_embeddings, model.output).double().eval()
    with torch.no_grad():
        head.fc.weight.mul_(3.0)  # far from the identity: its q differs from the verifier's p
    return head


def head_stack(names: list[str]) -> list:
    """The target tiny_model(0), then `names` from the draft pool ("ngram" last, "head" reading the
    level right above it)."""
    pool = draft_pool()
    levels = [level(tiny_model(0), "target")]
    for n in names:
        if n == "head":
            levels.append(HeadLevel(random_head(len(levels), levels[-1].model), levels[-1], "head"))
        elif n == "ngram":
            levels.append(NgramProposer())
        else:
            levels.append(level(pool[n], n))
    return levels


@settings(max_examples=60, deadline=None)
@given(
    above=st.lists(st.sampled_from(["s1", "near", "mid"]), max_size=1),
    ks=st.lists(st.integers(1, 5), min_size=2, max_size=2),
    tree=st.booleans(),
    prompt=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    n_new=st.integers(1, 14),
)
def test_greedy_is_the_targets_own(above, ks, tree, prompt, n_new):
    names = above + ["head"]
    trees = [None] * len(above) + [TreeShape(nodes=6, topk=2) if tree else None]
    out, _ = speculative_decode(
        head_stack(names), torch.tensor(prompt), n_new, k=ks[: len(names)], trees=trees
    )
    assert out.tolist() == greedy_reference(prompt, n_new)


CASES = {
    "head-t1.0": (["head"], [3], None, dict(temperature=1.0)),
    "mid-head-t0.7": (["mid", "head"], [3, 2], None, dict(temperature=0.7)),
    "head-tree-t1.0": (["head"], [3], [TreeShape(nodes=5, topk=2)], dict(temperature=1.0)),
    "s1-head-tree-topk": (["s1", "head"], [2, 2], [None, TreeShape(nodes=4, topk=2)], dict(top_k=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distribution_matches_target(case):
    names, k, trees, kw = CASES[case]
    kw = dict(temperature=1.0) | kw
    exact = exact_sequence_probs(tiny_model(0), PROMPT, 3, kw["temperature"], kw.get("top_k"))
    n_runs = 2000
    counts = sample_counts(head_stack(names), k, n_runs, 3, seed=0, trees=trees, **kw)
    pv = g_test(counts, exact, n_runs)
    print(f"{case}: G-test p-value {pv:.3g}")
    assert pv > ALPHA, f"{case}: G-test p-value {pv:.2e}: the output is not the target's distribution"


class CheckedHead(HeadLevel):
    """A HeadLevel whose every sequence forward is checked against a no-cache recomputation of the
    whole sequence: the verifier's features from a full forward of its model over buf, for every
    position the head should read them at (slot < known), and the head's own predictions, computed
    one position at a time, beyond."""

    run = None

    def forward(self, tokens, start_pos, last=None):
        out = super().forward(tokens, start_pos)
        end = start_pos + tokens.numel()
        seq = self.run.buf[:end].view(1, -1)
        with torch.no_grad():
            self.above.model(seq)
            true = self.above.model.features[0]
            feats = torch.zeros(end, true.shape[-1], dtype=true.dtype)
            n_true = min(end, self.known + 1)  # positions whose input feature is the verifier's
            feats[1:n_true] = true[: n_true - 1]
            h = self.model(seq[:, :n_true], feats[None, :n_true])[0]
            for t in range(n_true, end):  # beyond: the head's own prediction for the position before
                feats[t] = h[t - 1]
                h = self.model(seq[:, : t + 1], feats[None, : t + 1])[0]
            full = self.model.logits(h[start_pos:end]).float()
        torch.testing.assert_close(out, full, atol=1e-9, rtol=1e-9)
        self.checked += 1
        return out if last is None else out[-last:]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "names,k,share_kv",
    [
        (["head"], [3], True),
        (["near", "head"], [4, 2], False),
        (["mid", "head"], [3, 3], False),
        # An exact copy of the target in the middle takes the target's keys, values and features for
        # what it has not computed (share_kv): still exactly what it would compute itself.
        (["copy", "head"], [4, 2], True),
    ],
)
def test_head_cache_and_features_stay_right(names, k, share_kv, temperature):
    """The head's forwards against a recomputation from the verifier's own features (so drafts in the
    middle that differ from the target keep their own keys, values and features: share_kv off)."""
    levels = head_stack(names)
    levels[-1] = CheckedHead(levels[-1].model, levels[-2], "head")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        run = Speculation(levels, k, temperature, generator=g, share_kv=share_kv)
        levels[-1].run, levels[-1].checked = run, 0
        run.generate(torch.tensor(PROMPT), 16)
        assert levels[-1].checked > 0
        assert run.stats[-1].proposed > 0


class StaleHead(CheckedHead):
    """The bug the recomputation exists for: keep the cache entries computed from predicted features
    after the verifier has computed the true ones."""

    true_upto = property(lambda self: 1 << 30, lambda self, value: None)


def test_feature_check_catches_stale_predictions():
    levels = head_stack(["head"])
    levels[-1] = StaleHead(levels[-1].model, levels[0], "head")
    run = Speculation(levels, [3])
    levels[-1].run, levels[-1].checked = run, 0
    with pytest.raises(AssertionError):
        run.generate(torch.tensor(PROMPT), 16)


def test_head_must_sit_below_its_verifier():
    levels = head_stack(["s1", "head"])
    wrong = HeadLevel(random_head(0, tiny_model(0)), levels[0], "head")
    with pytest.raises(ValueError, match="right below"):
        speculative_decode([levels[0], levels[1], wrong], torch.tensor(PROMPT), 4, k=[2, 2])
    with pytest.raises(ValueError, match="dim"):
        HeadLevel(random_head(0, tiny_model(3, dim=32)), levels[0], "head")


def test_head_above_an_ngram_level_is_exact():
    # A head need not be last: it verifies an n-gram level's proposals like any model level.
    out, _ = speculative_decode(head_stack(["head", "ngram"]), torch.tensor(PROMPT), 12, k=[3, 2])
    assert out.tolist() == greedy_reference(PROMPT, 12)
    # Verifying n-gram trees, the head uses scratch slots past the end of its verifier's cache.
    trees = [None, TreeShape(nodes=4, topk=2)]
    out, stats = speculative_decode(
        head_stack(["head", "ngram"]), torch.tensor(PROMPT), 12, k=[3, 3], trees=trees
    )
    assert out.tolist() == greedy_reference(PROMPT, 12) and stats.levels[2].tree_nodes > 0


# ---------------------------------------------------------------------------------------------------
# Published EAGLE-1/2 heads: synthetic files in their authors' layout, checked against an independent
# re-implementation of EAGLE's layer with Hugging Face's names (separate q/k/v, rotate-half RoPE).
# ---------------------------------------------------------------------------------------------------


def eagle_files(folder, dim=16, n_head=2, n_kv=1, inter=24, vocab=6, fmt="bin", bias=True, extra=None):
    import json

    torch.manual_seed(5)
    hd = dim // n_head
    hf = {
        "fc.weight": torch.randn(dim, 2 * dim) * 0.3,
        "layers.0.self_attn.q_proj.weight": torch.randn(n_head * hd, dim) * 0.3,
        "layers.0.self_attn.k_proj.weight": torch.randn(n_kv * hd, dim) * 0.3,
        "layers.0.self_attn.v_proj.weight": torch.randn(n_kv * hd, dim) * 0.3,
        "layers.0.self_attn.o_proj.weight": torch.randn(dim, n_head * hd) * 0.3,
        "layers.0.mlp.gate_proj.weight": torch.randn(inter, dim) * 0.3,
        "layers.0.mlp.up_proj.weight": torch.randn(inter, dim) * 0.3,
        "layers.0.mlp.down_proj.weight": torch.randn(dim, inter) * 0.3,
        "layers.0.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(dim),
        "embed_tokens.weight": torch.randn(vocab, dim),  # the base model's: not used
    }
    if bias:
        hf["fc.bias"] = 0.1 * torch.randn(dim)
    hf |= extra or {}
    config = dict(
        architectures=["LlamaForCausalLM"], hidden_size=dim, intermediate_size=inter,
        num_attention_heads=n_head, num_key_value_heads=n_kv, num_hidden_layers=1, vocab_size=vocab,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(hf, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(hf, str(folder / "model.safetensors"))
    return hf


def eagle_reference(hf, emb, feat, n_head, n_kv):
    """EAGLE's head on a sequence, no cache: fc(cat(embeds, hidden)), then a Llama layer whose
    input norm is skipped, with HF's separate projections and rotate-half RoPE."""
    T, dim = feat.shape
    hd = dim // n_head
    x = torch.cat([emb, feat], -1) @ hf["fc.weight"].T + hf.get("fc.bias", 0)
    p = "layers.0.self_attn."
    q = (x @ hf[p + "q_proj.weight"].T).view(T, n_head, hd).transpose(0, 1)
    k = (x @ hf[p + "k_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1)
    v = (x @ hf[p + "v_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.outer(torch.arange(T).double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
    att = (q @ k.transpose(-1, -2)) / hd**0.5
    att = att.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf")).softmax(-1)
    h = x + (att @ v).transpose(0, 1).reshape(T, dim) @ hf[p + "o_proj.weight"].T
    n = (
        h
        * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        * hf["layers.0.post_attention_layernorm.weight"]
    )
    m = "layers.0.mlp."
    ffn = (
        torch.nn.functional.silu(n @ hf[m + "gate_proj.weight"].T) * (n @ hf[m + "up_proj.weight"].T)
    ) @ hf[m + "down_proj.weight"].T
    return h + ffn


@pytest.mark.parametrize("fmt,bias", [("bin", True), ("safetensors", False)])
def test_published_eagle_head_loads_and_computes_eagles_layer(tmp_path, fmt, bias):
    from checkpoint import load_eagle_head

    verifier = tiny_model(0)  # dim 16, 2 heads (2 of them key/value heads), vocab 6
    hf = eagle_files(tmp_path / "eagle", n_kv=2, fmt=fmt, bias=bias)
    hf = {k: v.double() for k, v in hf.items()}
    head = load_eagle_head(tmp_path / "eagle", verifier)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    feat = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        got = head(ids, feat)[0]
        want = eagle_reference(hf, verifier.tok_embeddings(ids)[0], feat[0], 2, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # RoPE runs in float32
    # And as a level: greedy speculation with it is the target's own.
    levels = [level(verifier, "target")]
    levels.append(HeadLevel(head, levels[0], "eagle"))
    out, _ = speculative_decode(levels, torch.tensor(PROMPT), 10, k=3)
    assert out.tolist() == greedy_reference(PROMPT, 10)


def test_eagle_heads_that_do_not_fit_are_clear_errors(tmp_path):
    from checkpoint import CheckpointError, load_eagle_head

    verifier = tiny_model(0)
    eagle_files(tmp_path / "wide", dim=32)
    with pytest.raises(CheckpointError, match="dim 32"):
        load_eagle_head(tmp_path / "wide", verifier)
    eagle_files(tmp_path / "vocab", vocab=9)
    with pytest.raises(CheckpointError, match="9 ids"):
        load_eagle_head(tmp_path / "vocab", verifier)
    eagle_files(tmp_path / "e3", extra={"d2t": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(CheckpointError, match="EAGLE-3"):
        load_eagle_head(tmp_path / "e3", verifier)
    hf = eagle_files(tmp_path / "broken")
    del hf["layers.0.mlp.up_proj.weight"]
    torch.save(hf, tmp_path / "broken" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="up_proj|w3"):
        load_eagle_head(tmp_path / "broken", verifier)
    with pytest.raises(CheckpointError, match="config.json"):
        load_eagle_head(tmp_path / "nothing", verifier)


def test_training_unroll_is_what_drafting_computes(monkeypatch):
    """scripts/train_head.py's training-time test: step d at position t must be exactly the head's
    forward when positions up to t-d+1 read true features and the d-1 after them read the head's own
    predictions (what drafting the d-th token of a round computes)."""
    import scripts.train_head as train

    torch.manual_seed(0)
    verifier = tiny_model(3, vocab=8, dim=32).float()
    head = FeatureHead(
        dataclasses.replace(verifier.config, n_layer=1), verifier.tok_embeddings, verifier.output
    )
    ids = torch.randint(0, 8, (2, 10))
    with torch.no_grad():
        verifier(ids)
    feat = verifier.features.detach()
    steps = []
    real = train.F.smooth_l1_loss
    monkeypatch.setattr(
        train.F, "smooth_l1_loss", lambda a, b, **kw: steps.append(a.detach()) or real(a, b, **kw)
    )
    train.unrolled_loss(head, ids, feat, torch.ones(2, 10), train.Settings(unroll=3))
    with torch.no_grad():
        for b in range(2):
            for t in range(9):  # head position t reads token t+1 and feature t, predicts feature t+1
                for d in range(1, min(3, t + 1) + 1):
                    f = feat[b, : t + 1].clone()
                    for j in range(1, d):  # positions t-d+2..t read predictions, oldest first
                        pos = t - d + 1 + j
                        f[pos] = head(ids[b : b + 1, 1 : pos + 1], f[None, :pos])[0, -1]
                    want = head(ids[b : b + 1, 1 : t + 2], f[None])[0, -1]
                    torch.testing.assert_close(steps[d - 1][b, t], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_head_reads_a_compiled_verifier(device):
    """The verifier's features come out of torch.compile (fullgraph; CUDA graphs on a GPU) too: its
    forward keeps them as a side effect that the compiled graph must replay."""
    from accel import compile_decode

    target = copy.deepcopy(tiny_model(0, dim=64, block_size=256)).float().to(device)
    verifier = ModelLevel(target, "target", compiled=compile_decode(target))
    head = HeadLevel(random_head(0, target).float().to(device), verifier, "head")
    prompt = torch.tensor(PROMPT * 3)
    out, stats = speculative_decode([verifier, head], prompt, 12, k=3)
    ref, _ = autoregressive_decode(ModelLevel(copy.deepcopy(target), "plain"), prompt, 12)
    assert out.tolist() == ref.tolist()
    # The same head over an eager verifier drafts the same tokens: it read the same features.
    eager = ModelLevel(copy.deepcopy(target), "eager")
    _, eager_stats = speculative_decode([eager, HeadLevel(head.model, eager, "head")], prompt, 12, k=3)
    assert stats.levels[1].proposed > 0
    assert stats.levels[1].accepted_at == eager_stats.levels[1].accepted_at
