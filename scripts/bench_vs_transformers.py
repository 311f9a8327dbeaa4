"""Our decoding against Hugging Face transformers and llama.cpp on the same machine, same prompts.

    python scripts/bench_vs_transformers.py --out results/cpu_vs_transformers
    python scripts/bench_vs_transformers.py --spec head:4 --spec mxfp4:4,head:3 --out ...

Both decode the embedded SmolLM2-135M-Instruct greedily from the same chat prompts (one per prompt
set), the same number of new tokens (EOS ignored, so every run makes exactly that many), batch 1, the
same threads. Runs alternate (ours, theirs, ours, ...) so a change in the machine's load hits both;
each figure is the median over the prompts of the best of --repeats runs. tokens/s counts new tokens
over the whole call, prefill included (what `generate` costs a user); decode ms/token excludes the
first token. transformers runs in its default fp32 and in bf16; ours in bf16 with the CPU kernels
(generate.py's default on this CPU), in fp32 (torch's GEMM), and as MXFP4 and int4 targets (every
linear cast, the output head too). llama.cpp (llama-cpp-python, when installed) decodes the embedded
GGUF file as it ships, Q4_1, with the same threads. --spec adds greedy speculative decoding on the
bf16 target with that stack of drafts (levels.parse_levels; fixed k), exact like the rest.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

# As generate.py: OpenMP's threads sleep after a region instead of spinning (docs/kernels.md).
# Everything in this process runs under it, transformers and llama.cpp included.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import bench_lib
from accel import accelerate
from checkpoint import default_checkpoint, load_model
from levels import build_levels, cast, parse_levels, tree_shape
from speculate import ModelLevel, autoregressive_decode, speculative_decode


def ours(dtype, kernels: bool, quant: str | None = None, spec: str | None = None):
    model, tok = load_model(device="cpu", dtype=dtype)
    report = accelerate(model, enabled=kernels)
    if spec:
        specs = parse_levels(spec)
        levels = build_levels(model, tok, specs, torch.device("cpu"), dtype, kernels=kernels)
        k = [x.k for x in specs]
        trees = [tree_shape(torch.device("cpu")) if x.tree else None for x in specs]
    else:
        levels = [ModelLevel(cast(model, quant) if quant else model)]
        accelerate(levels[0].model, enabled=kernels)

    def run(ids, n):
        t0 = time.perf_counter()
        if spec:
            out, st = speculative_decode(levels, torch.tensor(ids), n, k=k, trees=trees)
        else:
            out, st = autoregressive_decode(levels[0], torch.tensor(ids), n)
        return time.perf_counter() - t0, st.time_to_first_token, out.tolist()

    return run, tok, report


def llama_cpp():
    """The embedded GGUF (Q4_1) through llama.cpp, greedy, EOS ignored like the others; None when
    llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = torch.get_num_threads()
    llm = Llama(
        model_path=str(default_checkpoint()),
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(ids, n):
        # generate(reset=True) alone keeps the cache of the tokens it saw last and skips the prompt's
        # matching prefix: a repeat of the same prompt would then cost no prefill at all. reset() forgets
        # them, so every run evaluates its whole prompt, as ours and transformers' do.
        llm.reset()
        t0, first, out = time.perf_counter(), None, []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            out.append(int(tok))
            if first is None:
                first = time.perf_counter() - t0
            if len(out) == n:
                break
        return time.perf_counter() - t0, first, out

    return run


def theirs(dtype):
    from transformers import AutoModelForCausalLM

    path = default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()

    def run(ids, n):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            # One token first, to split prefill from decode the same way as ours.
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, t1, out[0, len(ids) :].tolist()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument(
        "--spec", action="append", default=[], help="also greedy SD on the bf16 target with these drafts"
    )
    p.add_argument("--no-4bit", action="store_true", help="leave out our MXFP4 and int4 targets")
    p.add_argument("--out", type=Path, default=None, help="output prefix: PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    runners = {}
    runners[f"ours bf16 (kernels {'on' if a.kernels else 'off'})"], tok, report = ours(
        torch.bfloat16, a.kernels
    )
    print(report)
    runners["ours fp32"], _, _ = ours(torch.float32, a.kernels)
    if not a.no_4bit:
        runners["ours MXFP4 target"], _, _ = ours(torch.bfloat16, a.kernels, quant="mxfp4")
        runners["ours int4 target"], _, _ = ours(torch.bfloat16, a.kernels, quant="int4")
    for spec in a.spec:
        runners[f"ours bf16 + SD {spec}"], _, _ = ours(torch.bfloat16, a.kernels, spec=spec)
    runners["transformers fp32"] = theirs(torch.float32)
    runners["transformers bf16"] = theirs(torch.bfloat16)
    if (run := llama_cpp()) is not None:
        runners["llama.cpp Q4_1"] = run
    else:
        print("llama-cpp-python is not installed: no llama.cpp row")
    prompts = [
        ids.tolist() for _, ids in bench_lib.encode_prompts(bench_lib.load_prompts(per_category=1), tok)
    ]
    n = a.max_new_tokens
    for run in runners.values():  # warm-up
        run(prompts[0], 4)
    best = {name: [] for name in runners}
    for ids in prompts:
        times = {name: [] for name in runners}
        for _ in range(a.repeats):
            for name, run in runners.items():
                total, first, _ = run(ids, n)
                times[name].append((total, first))
        for name in runners:
            total, first = min(times[name])
            best[name].append((total, first))
    rows = []
    for name, ts in best.items():
        tps = statistics.median(n / t for t, _ in ts)
        ms = statistics.median(1e3 * (t - f) / (n - 1) for t, f in ts if t > f) if n > 1 else 0.0
        rows.append(
            dict(impl=name, tokens_per_s=tps, decode_ms_per_token=ms)
        )  # the table's columns, in order
    ref = next(r for r in rows if r["impl"] == "transformers fp32")["tokens_per_s"]
    q41 = next((r["tokens_per_s"] for r in rows if r["impl"] == "llama.cpp Q4_1"), None)
    for r in rows:
        r["vs_transformers_fp32"] = r["tokens_per_s"] / ref
        if q41:
            r["vs_llama_cpp_q4_1"] = r["tokens_per_s"] / q41
    md = (
        f"SmolLM2-135M-Instruct, greedy, {len(prompts)} prompts x {n} new tokens, batch 1, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {bench_lib.cpu_name()}\n\n"
    ) + bench_lib.markdown_table(
        ["implementation", "tokens/s (prefill included)", "decode ms/token", "vs transformers fp32"]
        + (["vs llama.cpp Q4_1"] if q41 else []),
        [[r["impl"]] + [f"{r[k]:.2f}" for k in list(r)[1:]] for r in rows],
    )
    print(md)
    record = dict(bench_lib.environment(), rows=rows, settings=vars(a) | {"out": str(a.out)})
    bench_lib.write_outputs(a.out, record, md)
    return rows


if __name__ == "__main__":
    main()
