"""bench_lib's prompt reading (this project's layout and Spec-Bench's), its side-by-side summary and its
writers, on synthetic inputs: no model is loaded."""

import json
from types import SimpleNamespace

import pytest

import bench_lib
from stats import LevelStats


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_project_layout(tmp_path):
    rows = [{"id": f"code-0{i}", "category": "code", "prompt": f"write f{i}"} for i in range(3)]
    write_jsonl(tmp_path / "code.jsonl", rows)
    write_jsonl(
        tmp_path / "math.jsonl", [{"id": "math-01", "category": "math", "prompt": "2+2?", "answer": 4}]
    )
    got = bench_lib.load_prompts(tmp_path, per_category=2)
    assert [(r["id"], r["category"], r["prompt"]) for r in got] == [
        ("code-00", "code", "write f0"), ("code-01", "code", "write f1"), ("math-01", "math", "2+2?"),
    ]  # fmt: skip
    assert got[-1]["answer"] == 4  # other fields are kept
    assert len(bench_lib.load_prompts(tmp_path / "code.jsonl")) == 3


def test_spec_bench_layout_takes_the_first_turn(tmp_path):
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Compose a blog post.", "Rewrite it."]},
        {"question_id": 82, "category": "writing", "turns": ["Draft an email."]},
        {"question_id": 101, "category": "reasoning", "turns": ["Which is larger?", "Why?"]},
    ]
    path = write_jsonl(tmp_path / "question.jsonl", rows)
    got = bench_lib.load_prompts(path, per_category=1)
    assert [(r["id"], r["category"], r["prompt"]) for r in got] == [
        ("writing-81", "writing", "Compose a blog post."), ("reasoning-101", "reasoning", "Which is larger?"),
    ]  # fmt: skip


def test_bad_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="'prompt' or a 'turns'"):
        bench_lib.read_prompts(write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "text": "no prompt field"}]))
    with pytest.raises(ValueError, match="no prompts"):
        bench_lib.load_prompts(write_jsonl(tmp_path / "empty.jsonl", []))


def run(tokens, seconds, category="c", levels=()):
    return dict(id=f"p{tokens}", category=category, tokens=list(range(tokens)),
                stats=SimpleNamespace(total_time=seconds, levels=list(levels)))  # fmt: skip


def test_compare_speedup_and_its_spread_over_repeats():
    """Per-repeat speedups are each repeat's tokens/s over the baseline's in the same repeat."""
    draft = LevelStats("draft", 4, proposed=8, accepted=6, rounds=2)
    sd = [LevelStats("target"), draft]
    results = {
        ("AR", 0.0): [[run(10, 1.0)], [run(10, 2.0)]],  # the machine got twice as slow in repeat 2
        ("SD", 0.0): [[run(10, 0.5, levels=sd)], [run(10, 1.0, levels=sd)]],
    }
    rows = bench_lib.compare(results, {"AR": ["target"], "SD": ["target", "draft"]})
    ar, spec = rows
    assert ar["speedup"] == 1.0 and ar["greedy_identical"]
    assert spec["speedup_per_repeat"] == [2.0, 2.0] and spec["speedup_min"] == spec["speedup_max"] == 2.0
    assert spec["speedup"] == pytest.approx(2.0)
    (lv,) = spec["all"]["levels"]
    assert lv["acceptance_rate"] == pytest.approx(12 / 16) and lv["mean_accepted_length"] == pytest.approx(
        4.0
    )
    assert spec["by_category"]["c"]["speedup"] == pytest.approx(2.0)


def test_markdown_table_and_atomic_json(tmp_path):
    table = bench_lib.markdown_table(["a", "b"], [["x", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| x | 1 |"]
    path = bench_lib.write_json(tmp_path / "sub" / "r.json", {"n": 1})
    assert json.loads(path.read_text()) == {"n": 1} and not list(path.parent.glob("*.tmp"))
