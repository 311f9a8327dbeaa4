"""Tensor parallelism (tp.py) on the CPU: 2, 3 and 4 gloo ranks, spawned with torch.multiprocessing.

One spawn per world size runs every check in each rank and saves what the rank got; the tests below
compare that with the same computation in this (single) process:
  - logits of a no-cache prefill and of cached multi-token forwards, fp32, within 1e-6 of the largest
    logit (2e-6 for the untied models, 7e-5 for the tied ones);
  - greedy decoding with 1, 2 and 3 levels (MXFP4 drafts sharded, replicated, or cast from the shards,
    a small third model sharded or replicated) returns the single-process tokens;
  - seeded sampling (temperature 0.8, every rank's generator seeded alike) gives the same tokens on
    every rank and the same as one process with that seed;
  - every rank holds bit-identical logits (and, with gloo, bit-identical all-reduced hidden states);
  - compiled (fullgraph) on 2 ranks: the collectives are inside the traced graphs, and compiled greedy
    decoding gives the single-process tokens;
  - clear errors: heads / intermediate size / quantization blocks not divisible, already sharded,
    world size not that of the group, TP without torch.distributed.

The toy models: world 2 is grouped-query (4 q heads, 2 kv heads); world 3 has 6/3 heads and a
256-token vocabulary, which 3 ranks split with padding; world 4 is multi-head (4/4). Each also comes
with a tied output head (as SmolLM2's), for the logits. All fp32, 2 layers, head_dim a multiple of
16: the CPU kernels (attention, RMSNorm, RoPE, MXFP4) take the local shapes as they are.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp
from accel import compile_decode
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer
from mxfp4 import MXFP4Linear, quantize_model
from speculate import ModelLevel, autoregressive_decode, speculative_decode

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WORLDS = (2, 3, 4)
VOCAB = 256
PROMPT = [5, 17, 99, 3, 250, 17, 99, 42]
NEW = 24
TEMPERATURE, SEED = 0.8, 1234
COMPILED = 2  # the world size that also runs compiled (inductor on the CPU takes a while)
COLLECTIVES = ("all_reduce", "all_gather_into_tensor")

CONFIGS = {
    2: dict(n_head=4, n_local_heads=2, dim=64, intermediate_size=128),
    3: dict(n_head=6, n_local_heads=3, dim=96, intermediate_size=192),
    4: dict(n_head=4, n_local_heads=4, dim=128, intermediate_size=256),
}


def make(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = dict(block_size=64, vocab_size=VOCAB, n_layer=2)
    return Transformer(ModelArgs(**{**args, **kw})).eval().requires_grad_(False)


def target(world: int) -> Transformer:
    return make(0, **CONFIGS[world])


def tied(world: int) -> Transformer:
    """The target's shapes with the output head tied to the embedding, as in SmolLM2. (Logits only:
    a random tied model just repeats a token, greedy.)"""
    return make(3, **CONFIGS[world], tie_embeddings=True)


def small(world: int) -> Transformer:
    """A random third level (one layer, `world` heads), unrelated to the target: often rejected."""
    return make(1, n_layer=1, n_head=world, dim=32 * world, intermediate_size=64 * world)


def level(model, name):
    return ModelLevel(model, name)


def stacks(world: int, shard) -> dict:
    """Name -> (levels, k). `shard` is tp.apply_tp in the ranks and the identity here."""
    t = target(world)
    draft = quantize_model(t)  # cast from the whole target, before the target is sharded
    replicated = quantize_model(t)  # the same draft, left whole on every rank
    shard(t)
    from_shards = quantize_model(t)  # cast from the local shards: sharded like the target
    s_sharded, s_replicated = shard(small(world)), small(world)
    shard(draft)
    L = level
    return {
        "1 level": ([L(t, "t")], None),
        "mxfp4 sharded": ([L(t, "t"), L(draft, "d")], 3),
        "mxfp4 replicated": ([L(t, "t"), L(replicated, "d")], 3),
        "mxfp4 from shards": ([L(t, "t"), L(from_shards, "d")], 3),
        "3 levels sharded": ([L(t, "t"), L(draft, "d"), L(s_sharded, "s")], [4, 2]),
        "3 levels, small replicated": ([L(t, "t"), L(from_shards, "d"), L(s_replicated, "s")], [4, 2]),
    }


@torch.no_grad()
def logits_of(model: Transformer) -> dict:
    """A no-cache prefill, then a cached prefill and a cached 4-token forward."""
    tokens = torch.tensor([PROMPT + [7, 8, 9, 10]])
    out = {"prefill": model(tokens)}
    model.setup_caches(1, 32)
    out["cached prefill"] = model(tokens[:, :8], torch.arange(8))
    out["cached 4 tokens"] = model(tokens[:, 8:], torch.arange(8, 12))
    return out


def decode_all(world: int, shard) -> dict:
    out = {}
    for name, (levels, k) in stacks(world, shard).items():
        out[f"greedy {name}"] = speculative_decode(levels, torch.tensor(PROMPT), NEW, k=k)[0]
    levels, k = stacks(world, shard)["mxfp4 sharded"]
    gen = torch.Generator().manual_seed(SEED)
    out["sample AR"] = autoregressive_decode(
        levels[0], torch.tensor(PROMPT), NEW, TEMPERATURE, generator=gen
    )[0]
    gen = torch.Generator().manual_seed(SEED)
    out["sample 2 levels"] = speculative_decode(
        levels, torch.tensor(PROMPT), NEW, k=k, temperature=TEMPERATURE, generator=gen
    )[0]
    return out


def compiled(world: int) -> dict:
    """torch.compile (fullgraph, as ModelLevel compiles on CUDA) of the sharded target: which
    collectives the traced graphs hold, and greedy decoding with compiled levels."""
    t = tp.apply_tp(target(world))
    draft = tp.apply_tp(quantize_model(target(world)))
    graphs = []

    def record(gm, example_inputs):  # a backend that keeps the traced code and runs it as it is
        graphs.append(gm.code)
        return gm.forward

    t.setup_caches(1, 32)
    torch.compile(t, backend=record, fullgraph=True, dynamic=False)(torch.tensor([PROMPT]), torch.arange(8))
    code = "\n".join(graphs)
    out = {"collectives": {op: code.count(f"_c10d_functional.{op}(") for op in COLLECTIVES}}
    L = lambda m, name: ModelLevel(m, name, compiled=compile_decode(m))  # noqa: E731
    out["greedy 1 level"] = speculative_decode([L(t, "t")], torch.tensor(PROMPT), NEW)[0]
    out["greedy mxfp4 sharded"] = speculative_decode(
        [L(t, "t"), L(draft, "d")], torch.tensor(PROMPT), NEW, k=3
    )[0]
    return out


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def errors(world: int) -> dict:
    w = world
    bad_heads = make(2, n_head=w + 1, dim=32 * (w + 1), intermediate_size=64 * w)
    bad_kv = make(2, n_head=2 * w, n_local_heads=1, dim=32 * w, intermediate_size=64 * w)
    bad_ffn = make(2, n_head=w, dim=32 * w, intermediate_size=64 * w + 1)
    # head_dim 16: wo's 16 * w input features give 16 per rank, half an MXFP4 block. (An odd world
    # size cannot fail this way: K a multiple of 32 and of w is then a multiple of 32 * w.)
    bad_block = (
        quantize_model(make(2, n_head=w, dim=16 * w, intermediate_size=64 * w)) if w % 2 == 0 else None
    )
    sharded = tp.apply_tp(make(2, n_head=w, dim=32 * w, intermediate_size=64 * w))
    return {
        "heads": error_of(lambda: tp.apply_tp(bad_heads)),
        "kv heads": error_of(lambda: tp.apply_tp(bad_kv)),
        "intermediate": error_of(lambda: tp.apply_tp(bad_ffn)),
        "block": error_of(lambda: tp.apply_tp(bad_block)) if bad_block is not None else None,
        "twice": error_of(lambda: tp.apply_tp(sharded)),
        "world size": error_of(lambda: tp.apply_tp(make(2, n_head=w, dim=32 * w), world_size=w + 1)),
        "unchanged": bad_heads.layers[0].attention.n_head == w + 1,
    }


def _worker(rank: int, world: int, folder: str):
    torch.set_num_threads(1)
    # A rank that fails leaves the others in a collective: the timeout turns that into an error.
    rendezvous, timeout = f"file://{folder}/rendezvous", timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=rendezvous, timeout=timeout, world_size=world, rank=rank)
    assert tp.is_tp() and tp.rank() == rank and tp.world_size() == world
    assert tp.maybe_init_dist() == rank  # already initialised: just the rank
    out = {}
    model = tp.apply_tp(target(world))
    hidden = {}

    def keep_hidden(module, args, y):  # the residual stream after the last block: all-reduced
        hidden.setdefault("h", y.clone())

    model.layers[-1].register_forward_hook(keep_hidden)
    out["logits"] = logits_of(model)
    out["hidden"] = hidden["h"]
    model = tp.apply_tp(tied(world))
    out["tied logits"] = logits_of(model)
    emb, head = model.tok_embeddings.weight, model.output.weight
    out["tied head is a view"] = head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
    a = model.layers[0].attention
    out["local shapes"] = (a.n_head, a.n_local_heads, tuple(a.kv_cache.k_cache.shape))
    # Caches allocated before sharding are reallocated with the local kv heads.
    early = target(world)
    early.setup_caches(1, 16)
    tp.apply_tp(early)
    out["early cache"] = tuple(early.layers[0].attention.kv_cache.k_cache.shape)
    out["decode"] = decode_all(world, tp.apply_tp)
    out["errors"] = errors(world)
    if world == COMPILED:
        out["compiled"] = compiled(world)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world -> [what each rank saved]. One spawn per world size, for all tests."""
    cpu_kernels.available()  # build the CPU kernels here (first use) rather than in every rank
    out = {}
    for world in WORLDS:
        folder = tmp_path_factory.mktemp(f"tp{world}")
        mp.spawn(_worker, args=(world, str(folder)), nprocs=world, join=True)
        out[world] = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("head", ["logits", "tied logits"])
def test_logits_match_one_process(ranks, world, head):
    want = logits_of(target(world) if head == "logits" else tied(world))
    for r, got in enumerate(ranks[world]):
        for name, logits in want.items():
            assert got[head][name].shape == logits.shape, name
            # fp32 sums in another order: within 1e-6 of the largest logit (~2 untied, ~70 tied).
            atol = 1e-6 * logits.abs().max().item()
            torch.testing.assert_close(got[head][name], logits, atol=atol, rtol=0, msg=f"rank {r} {name}")
        if head == "tied logits":  # the head's shard is a view of the embedding, unless padded
            padded = VOCAB % world and r == world - 1
            assert got["tied head is a view"] == (not padded)


@pytest.mark.parametrize("world", WORLDS)
def test_ranks_agree_bitwise(ranks, world):
    first = ranks[world][0]
    for got in ranks[world][1:]:
        for head in ("logits", "tied logits"):
            for name, logits in first[head].items():
                assert torch.equal(got[head][name], logits), name
        # Not relied upon (the logits come out of an all-gather), but gloo's ring all-reduce does it.
        assert torch.equal(got["hidden"], first["hidden"])
        for name, tokens in first["decode"].items():
            assert torch.equal(got["decode"][name], tokens), name


@pytest.mark.parametrize("world", WORLDS)
def test_local_shapes(ranks, world):
    c = CONFIGS[world]
    cache = (1, c["n_local_heads"] // world, 32, c["dim"] // c["n_head"])
    for got in ranks[world]:
        assert got["local shapes"] == (c["n_head"] // world, c["n_local_heads"] // world, cache)
        assert got["early cache"] == (1, c["n_local_heads"] // world, 16, cache[-1])


@pytest.mark.parametrize("world", WORLDS)
def test_decoding_matches_one_process(ranks, world):
    want = decode_all(world, lambda m: m)
    greedy = want["greedy 1 level"]
    for name, tokens in want.items():
        if name.startswith("greedy"):
            assert torch.equal(tokens, greedy), name  # speculation is exact (single process)
    for r, got in enumerate(ranks[world]):
        assert got["decode"].keys() == want.keys()
        for name, tokens in want.items():
            assert torch.equal(got["decode"][name], tokens), f"rank {r}: {name}"
    assert not torch.equal(want["sample AR"], greedy)  # the sampling tests do sample


def test_compiled_step_holds_the_collectives(ranks):
    """Under torch.compile the all-reduces (one after each attention and each feed-forward) and the
    vocabulary-parallel head's all-gather are traced into the graphs, with no graph break
    (fullgraph=True), and compiled decoding gives the single-process eager tokens on every rank."""
    want = decode_all(COMPILED, lambda m: m)
    layers = target(COMPILED).config.n_layer
    for r, got in enumerate(ranks[COMPILED]):
        c = got["compiled"]
        assert c["collectives"] == {"all_reduce": 2 * layers, "all_gather_into_tensor": 1}
        for name in ("greedy 1 level", "greedy mxfp4 sharded"):
            assert torch.equal(c[name], want[name]), f"rank {r}: {name}"


@pytest.mark.parametrize("world", WORLDS)
def test_errors(ranks, world):
    e = ranks[world][0]["errors"]
    assert e["heads"].startswith(f"n_head={world + 1} is not divisible by the tensor-parallel world size")
    assert e["kv heads"].startswith("n_local_heads=1 (key/value heads) is not divisible")
    assert e["intermediate"].startswith(f"intermediate_size={64 * world + 1} is not divisible")
    if world % 2 == 0:
        assert e["block"] == (
            f"layers.0.attention.wo: K={16 * world} input features over {world} ranks is 16 per rank, "
            f"not a multiple of the 32-element quantization block of its `scales` ({world // 2} columns): "
            f"this layer cannot be split row-parallel {world} ways"
        )
    assert e["twice"].startswith(f"the model is already sharded over {world} ranks")
    assert e["world size"] == (
        f"world_size={world + 1} but the process group has {world} ranks: "
        f"launch with torchrun --nproc-per-node {world + 1}"
    )
    assert e["unchanged"]  # a refused model is left as it was


def test_without_distributed():
    assert not dist.is_initialized()
    assert tp.maybe_init_dist() is None  # not under torchrun
    assert not tp.is_tp() and tp.rank() == 0 and tp.world_size() == 1
    model = target(2)
    with pytest.raises(ValueError, match="launch with torchrun --nproc-per-node 2"):
        tp.apply_tp(model, world_size=2)
    assert tp.apply_tp(model) is model and not hasattr(model, "tp")  # one process: unchanged
    assert model.layers[0].attention.n_head == CONFIGS[2]["n_head"]


def quantized(kind: str, linear: torch.nn.Linear, group: int = 32):
    if kind == "mxfp4":
        import mxfp4

        return MXFP4Linear.from_linear(linear), mxfp4.dequantize
    int4 = pytest.importorskip("int4")
    return int4.Int4Linear.from_linear(linear, group_size=group), int4.dequantize


@pytest.mark.parametrize("kind", ["mxfp4", "int4"])
def test_quantized_layers_split_in_whole_blocks(kind):
    """The generic split of `codes`/`scales`, checked without processes: rank r's row-parallel shard
    holds exactly columns r*K/2..(r+1)*K/2 of the weight, its column-parallel shard those rows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 8, bias=False)
    full, dequantize = quantized(kind, linear)
    w = dequantize(full.codes, full.scales, torch.float32)
    for r in range(2):
        q, _ = quantized(kind, linear)
        tp._shard_rows_of_k(q, 2, r)
        assert q.in_features == 64 and q.codes.shape == (8, 32)
        assert q.scales.shape == (8, 2)  # 64 of K: two blocks (or int4 groups) of 32
        torch.testing.assert_close(dequantize(q.codes, q.scales, torch.float32), w[:, 64 * r : 64 * (r + 1)])
        q, _ = quantized(kind, linear)
        tp._shard_columns(q, [8], 2, r)
        assert q.out_features == 4
        torch.testing.assert_close(dequantize(q.codes, q.scales, torch.float32), w[4 * r : 4 * (r + 1)])
    if kind == "mxfp4":  # and the shards' partial outputs add up to the layer's output
        x, total = torch.randn(3, 128), torch.zeros(3, 8)
        for r in range(2):
            q, _ = quantized(kind, linear)
            tp._shard_rows_of_k(q, 2, r)
            total += q(x[:, 64 * r : 64 * (r + 1)])
        torch.testing.assert_close(total, full(x), atol=1e-5, rtol=0)
    else:  # one 128-element group per row cannot be split in two
        q, _ = quantized(kind, linear, group=128)
        with pytest.raises(
            ValueError, match="not a multiple of the 128-element quantization block of its `scales`"
        ):
            tp._check_row_parallel(q, "w2", 2)
