"""The CLI and the real embedded model end to end: greedy text against transformers, speculation on
SmolLM2 giving the target's own tokens, and the clear errors a user can run into."""

import pytest
import torch

import generate
from checkpoint import load_model
from levels import LevelSpec, build_levels
from speculate import ModelLevel, TreeShape, autoregressive_decode, speculative_decode

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Q: What is 12 * 7?\nA:",
]


@pytest.mark.slow
def test_greedy_text_equals_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    level = ModelLevel(model)
    for text in PROMPTS:
        ids = tok.encode(text)
        ours, _ = autoregressive_decode(level, torch.tensor(ids), 24, stop_ids=tok.stop_ids)
        with torch.no_grad():
            ref = hf_smollm2.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=sorted(tok.stop_ids),
                pad_token_id=0,
            )[0, len(ids) :]
        assert ours.tolist() == ref.tolist(), (text, tok.decode(ours.tolist()), tok.decode(ref.tolist()))


@pytest.fixture(scope="module")
def smollm2_f64():
    # float64 leaves no near-ties: a verification forward over k+1 tokens and k+1 single steps then
    # pick the same argmax, so greedy speculation must reproduce plain greedy decoding exactly.
    return load_model(dtype=torch.float64)


# The MXFP4 draft in float64 dequantizes on every call (no native kernel for float64): one stack that
# holds every kind of draft keeps this affordable; the tiny-only stack is cheap.
@pytest.mark.slow
@pytest.mark.parametrize(
    "drafts,trees",
    [
        ([("tiny", 3)], None),  # tiny is the feature head (levels.TINY)
        ([("student", 3)], None),
        ([("mxfp4", 4), ("tiny", 2), ("ngram", 2)], None),
        ([("tiny", 3)], [TreeShape(nodes=10, topk=4)]),  # EAGLE-2 style: the target verifies trees
        # The hierarchy (an intermediate verifies trees); with mxfp4 + tiny it is in test_cpu_kernels.py,
        # in bf16 with the kernels: float64 MXFP4 dequantizes on every call and took minutes here.
        ([("tiny", 4), ("ngram", 2)], [None, TreeShape(nodes=8, topk=3)]),
    ],
    ids=["tiny", "student", "mxfp4+tiny+ngram", "tiny-tree", "tiny+ngram-tree"],
)
def test_speculation_on_smollm2_returns_the_targets_greedy_tokens(smollm2_f64, drafts, trees):
    model, tok = smollm2_f64
    prompt = torch.tensor(
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three fruits."}]))
    )
    ref, _ = autoregressive_decode(ModelLevel(model), prompt, 16, stop_ids=tok.stop_ids)
    levels = build_levels(model, tok, drafts, "cpu", torch.float64)
    out, stats = speculative_decode(
        levels, prompt, 16, k=[k for _, k in drafts], stop_ids=tok.stop_ids, trees=trees
    )
    assert out.tolist() == ref.tolist()
    assert stats.levels[1].proposed > 0


@pytest.mark.slow
def test_cli_plain_and_speculative_runs(capsys):
    stats = generate.main(["--prompt", "The capital of France is", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert stats.new_tokens == 6 and out.out.strip()
    assert "tokens/s" in out.err and "GB/s of weights" in out.err
    stats = generate.main(
        ["--prompt", "1, 2, 3, 4, 5,", "--max-new-tokens", "8", "--draft", "mxfp4", "--draft2", "ngram"]
    )
    out = capsys.readouterr()
    assert "acceptance by position" in out.err and len(stats.levels) == 3
    stats = generate.main(
        ["--prompt", "1, 2, 3, 1, 2, 3,", "--max-new-tokens", "8", "--levels", "tiny:2,ngram:3:tree"]
    )
    out = capsys.readouterr()
    assert "mean tree verified, level 2 ngram" in out.err and stats.levels[2].tree_nodes > 0


@pytest.mark.slow
def test_cli_quantized_target_and_draft(capsys):
    # A 4-bit target, and a draft that is itself cast (student@mxfp4) drafting trees for it.
    argv = ["--prompt", "1, 2, 3, 1, 2, 3,", "--max-new-tokens", "6", "--target-quant", "int4"]
    stats = generate.main(
        argv + ["--levels", "student@mxfp4:2:tree", "--tree-nodes", "4", "--tree-topk", "2"]
    )
    err = capsys.readouterr().err
    assert "0 target(int4)" in err and "1 student@mxfp4" in err and stats.levels[1].tree_nodes > 0


def run_cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code != 0
    return str(e.value.code) + capsys.readouterr().err


def test_cli_argument_errors(capsys):
    assert "k must be >= 1" in run_cli_error(["--draft", "ngram", "--k", "0"], capsys)
    assert "ngram can only be the last level" in run_cli_error(["--levels", "ngram:2,mxfp4:2"], capsys)
    assert "--draft2 needs a --draft" in run_cli_error(["--draft2", "tiny"], capsys)
    assert "kind:k" in run_cli_error(["--levels", "mxfp4"], capsys)
    assert "--temperature" in run_cli_error(["--temperature", "-1"], capsys)
    assert "need a draft at that level" in run_cli_error(["--draft", "tiny", "--tree2"], capsys)
    assert "only the last draft level" in run_cli_error(["--levels", "tiny:2:tree,ngram:2"], capsys)
    assert "nodes >= 1" in run_cli_error(["--draft", "tiny", "--tree", "--tree-nodes", "0"], capsys)
    assert "launch with torchrun" in run_cli_error(["--tp"], capsys)
    assert ":shard or :replicate" in run_cli_error(["--levels", "tiny:2:shard:replicate"], capsys)


def test_level_flags_parse():
    args = generate.parse_args(["--levels", "mxfp4:6:replicate,tiny:3:tree:shard"])
    assert args.drafts == [LevelSpec("mxfp4", 6, False, "replicate"), LevelSpec("tiny", 3, True, "shard")]
    assert args.trees[0] is None and args.trees[1] is not None
    args = generate.parse_args(["--draft", "mxfp4", "--draft2", "tiny", "--tree2", "--shard-drafts"])
    assert args.drafts == [LevelSpec("mxfp4", 6, False, "shard"), LevelSpec("tiny", 3, True, "shard")]
    assert args.trees[0] is None and args.trees[1] is not None


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert "checkpoint not found" in run_cli_error(["--checkpoint", str(tmp_path / "nope.gguf")], capsys)


@pytest.mark.slow
def test_cli_prompt_longer_than_context(capsys):
    msg = run_cli_error(["--prompt", "hi", "--max-new-tokens", "9000"], capsys)
    assert "exceeds the model's context of 8192" in msg


@pytest.mark.slow
def test_cli_draft_with_another_vocabulary(tmp_path, capsys):
    from test_model import hf_llama

    hf_llama(tmp_path)  # a Llama with 96 tokens and no tokenizer
    msg = run_cli_error(["--max-new-tokens", "4", "--draft", str(tmp_path)], capsys)
    assert "another tokenizer" in msg
