"""Distil the `tiny` draft (tiny.py) from the embedded SmolLM2-135M-Instruct, on the CPU, offline.

    python scripts/distill_tiny.py data     # target generations + offline text -> teacher top-k (WORKDIR)
    python scripts/distill_tiny.py train    # student from target layers -> tiny/smollm2-135m-tiny.pth
    python scripts/distill_tiny.py eval     # agreement with the target and ms/token, on held-out prompts
    python scripts/distill_tiny.py all      # the three in a row

What it does, and why:
  data   The draft's job is to predict the target's next token on text the target itself writes, so
         most of the training text is the target's own answers to varied chat prompts (explanations,
         stories, code, summaries, maths, factual questions), generated greedily (what greedy decoding
         will see) and some sampled at temperature 0.8 (what sampling will see), in the chat template.
         Batched, left-padded generation (RoPE only sees relative positions, pads are masked) makes this
         affordable on a CPU. Teacher-forced forwards over offline text that every install has (Python's
         own documentation and source, the READMEs of the installed packages) add breadth cheaply.
         The target's distribution at every position is kept as its top-k log-probabilities (k=32 holds
         nearly all of the mass of a 135M model's next-token distribution), so training never runs
         the target again.
  train  The student is a few of the target's layers (SOURCE_LAYERS) + its final norm, fine-tuned with
         the cross-entropy against the target's top-k distribution (forward KL up to a constant) plus
         a hard-label term on the target's argmax (greedy acceptance is argmax agreement). The shared
         embedding and head stay frozen. The head is restricted to the N_SUBSET most frequent tokens of
         the training text (FR-Spec), in training as in use. Only the layers' deltas from their source
         layers are stored, quantized (tiny.save_tiny).
  eval   Held-out prompts of four kinds (never in the training prompts): the target's greedy
         continuation, then teacher-forced greedy agreement of the draft, the untrained early exit of
         the same depth, and ms per cached T=1 forward of each.

Settings are printed and saved next to the artifact (tiny/distill_settings.json), and a report of the
evaluation to tiny/eval.json. The work folder (default /tmp/specqd_tiny) holds the data (~32 MB), never
committed. Use one thread (`--threads 1`, the default) on a shared machine.

The committed artifact came from the defaults on a 2-core CPU: `data --threads 2` (480 answers = 77.8k
tokens in 1054 s, then 80k tokens of offline text in 121 s), then `train` on one thread for 40 minutes
(the time limit ended it after 1390 steps of 1024 tokens, ~9 passes over the 157k tokens), while the
feature head (scripts/train_head.py) trained on the same data with the same budget on the other
thread. It is not bit-reproducible: the schedule's length follows the machine's pace, and CPU float
sums vary with threads. Its training agreement reached 0.91 against 0.39 on held-out prompts: with
this little data it overfits, so more generated answers are the first thing to buy with more compute
(the 20-minute run before it reached 0.34 held out).
"""

import argparse
import json
import math
import random
import sysconfig
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import sampling
from checkpoint import load_model
from model import rope_table
from tiny import ARTIFACT, load_tiny, save_tiny, student_from_target

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    seed: int = 0
    workdir: str = "/tmp/specqd_tiny"
    out: str = str(ARTIFACT.relative_to(ROOT))  # the artifact; settings and eval.json go next to it
    threads: int = 1
    # data
    gen_new_tokens: int = 160  # per answer (an answer stops earlier at <|im_end|>)
    gen_batch: int = 24
    sampled_fraction: float = 0.35  # share of prompts also answered by sampling (temperature 0.8, top-p 0.95)
    offline_tokens: int = 80_000  # teacher-forced tokens of offline text
    offline_chunk: int = 256
    topk: int = 32  # teacher log-probs kept per position
    # student
    source_layers: list = field(default_factory=lambda: [0, 1, 2, 29])
    n_subset: int = 16384  # FR-Spec head size (most frequent tokens of the training data)
    delta_bits: int = 4
    # training
    steps: int = 2000  # an upper bound: the time limit ends the committed run at 412
    batch_tokens: int = 1024  # per optimizer step (sequences padded into a batch)
    max_len: int = 512
    lr: float = 1e-3  # 3e-4 learnt clearly slower per token in a side-by-side run
    warmup: int = 30
    weight_decay: float = 0.0
    hard_weight: float = 0.5  # weight of the cross-entropy on the target's argmax
    prompt_weight: float = 0.3  # loss weight of prompt positions (the draft mostly predicts answers)
    time_limit_s: float = 2400.0  # training stops early (cosine schedule squeezed) past this wall time


# --- prompts ------------------------------------------------------------------------------------------
# Training prompts are built from templates x topics; the held-out evaluation prompts (EVAL_PROMPTS)
# are written separately and are not among them.

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "climate change",
    "the immune system", "blockchain", "the water cycle", "quantum computing", "the Roman Empire",
    "inflation in economics", "volcanoes", "the internet", "DNA", "renewable energy", "gravity",
    "the stock market", "vaccines", "the Renaissance", "plate tectonics", "neural networks",
    "the human heart", "electric cars", "the Moon landing", "compound interest", "sleep",
    "operating systems", "the printing press", "coral reefs", "supply and demand", "recycling",
    "the Industrial Revolution", "encryption", "earthquakes", "the solar system", "antibiotics",
    "democracy", "cloud computing", "bees and pollination", "the theory of evolution", "meditation",
    "World War I", "nuclear fusion", "social media", "the Great Wall of China", "rainbows",
    "databases", "the Olympic Games", "batteries", "jazz music", "deserts", "3D printing",
    "the placebo effect", "the speed of light", "ancient Egypt", "memory in the brain", "tides",
]  # fmt: skip
CHAT_TEMPLATES = [
    "Explain {t} in simple terms.", "What is {t}?", "Give me three interesting facts about {t}.",
    "Why is {t} important?", "Write a short paragraph about {t} for a ten-year-old.",
    "What are the pros and cons of {t}?", "How would you describe {t} to someone who has never heard of it?",
    "Write a haiku about {t}.", "List five questions a student might ask about {t}.",
    "What is a common misconception about {t}?", "Write a tweet about {t}.",
    "Summarize the history of {t} in a few sentences.",
]  # fmt: skip
ADVICE = [
    "How can I improve my sleep?", "Give me tips for learning a new language.",
    "How do I prepare for a job interview?", "What should I pack for a weekend camping trip?",
    "How can I save money on groceries?", "Suggest a healthy breakfast.", "How do I start running?",
    "What are good ways to reduce stress?", "How do I write a good resume?",
    "Plan a one-day trip to Paris.", "Give me a simple recipe for pancakes.",
    "How can I be more productive in the morning?", "What are some fun indoor activities for kids?",
    "How do I care for a houseplant?", "Write a polite email declining a meeting invitation.",
    "Write a thank-you note to a teacher.", "Write a short story about a dragon who is afraid of fire.",
    "Write a poem about the ocean.", "Tell me a joke about computers.", "Write a limerick about a cat.",
    "Write a product description for a reusable water bottle.",
    "Give me a motivational quote and explain it.",
    "Describe a sunset over the mountains.", "Write a dialogue between a customer and a waiter.",
    "What is the difference between weather and climate?", "Hi! How are you today?",
    "Can you recommend some classic novels?", "What makes a good leader?",
    "How do airplanes stay in the air?", "Why do cats purr?",
]  # fmt: skip
CODE_TASKS = [
    "reverses a string", "returns the factorial of n", "checks whether a number is prime",
    "computes the n-th Fibonacci number", "counts the vowels in a string",
    "finds the largest element of a list",
    "removes duplicates from a list", "sorts a list of dictionaries by a key", "merges two sorted lists",
    "converts Celsius to Fahrenheit", "reads a file and counts its lines", "computes the mean of a list",
    "finds the greatest common divisor of two numbers", "flattens a nested list",
    "checks if two strings are anagrams",
    "returns the squares of the even numbers in a list", "implements binary search",
    "counts word frequencies in a text", "validates an email address with a regular expression",
    "transposes a matrix", "implements a stack class", "computes the sum of digits of an integer",
]  # fmt: skip
CODE_TEMPLATES = [
    "Write a Python function that {t}.", "Write a JavaScript function that {t}.",
    "How would you write a function that {t}? Use Python.", "Write a C function that {t}.",
]  # fmt: skip
CODE_OTHER = [
    "What is the difference between a list and a dictionary in Python?", "Explain recursion with an example.",
    "What does the `yield` keyword do in Python?", "Explain what a SQL JOIN is.",
    "What is object-oriented programming?", "How do I read a CSV file in Python?",
    "What is the time complexity of quicksort?", "Explain what Git branches are.",
    "Write a SQL query that selects all users older than 30.", "What is a REST API?",
    "Explain the difference between `==` and `is` in Python.", "How do I handle exceptions in Python?",
    "Write a bash command that counts the files in a directory.", "What is a hash table?",
]  # fmt: skip
SUMMARY_TEMPLATES = [
    "Summarize the following text in two sentences:\n\n{t}", "Give a one-sentence summary of this:\n\n{t}",
    "What is the main idea of this passage?\n\n{t}", "Summarize this in simple words:\n\n{t}",
]  # fmt: skip

EVAL_PROMPTS = {
    "chat": [
        "What are some good habits for staying focused while studying?",
        "Write a short story about a robot who wants to become a gardener.",
    ],
    "code": [
        "Write a Python function that checks whether a string is a palindrome.",
        "Explain the difference between a tuple and a list in Python, with an example.",
    ],
    "summarisation": [
        "Summarize the following text in one sentence:\n\nThe city council met on Tuesday to discuss the new "
        "bicycle lanes planned for the downtown area. Supporters argued that the lanes would reduce "
        "traffic and make the streets safer for children, while shop owners worried that removing "
        "parking spaces would hurt their businesses. After three hours of debate, the council voted to "
        "build the lanes on two streets first and to review the results after one year.",
        "Give a short summary of this paragraph:\n\nHoneybees live in colonies with a single queen, "
        "thousands of female workers and a few hundred male drones. Workers gather nectar and pollen, "
        "build the wax comb, feed the young and defend the hive. In winter the bees cluster together "
        "and shiver their flight muscles to keep the queen warm.",
    ],
    "maths": [
        "A shop sells pencils at 3 for $1.20. How much do 12 pencils cost? Explain step by step.",
        "Solve for x: 4x - 7 = 2x + 9. Show your work.",
    ],
}


def maths_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 30)
        out.append(
            rng.choice(
                [
                    f"What is {a} + {b}?",
                    f"What is {a} times {c}?",
                    f"Solve for x: {c}x + {a} = {a + c * b}.",
                    f"What is {c}% of {a * 10}?",
                    f"A train travels {a} km per hour for {c} hours. How far does it go?",
                    f"If I have {a} apples and give away {min(a - 1, c)}, how many are left?",
                    f"What is the area of a rectangle that is {a} m long and {c} m wide?",
                    f"Is {a * c + 1} a prime number? Explain.",
                    f"Tom is {c} years old. His mother is {a} years older. How old is she?",
                    f"A book costs ${a}. It is on sale for {c * 2}% off. What is the sale price?",
                ]
            )
        )
    return out


def training_prompts(rng: random.Random, passages: list[str]) -> list[str]:
    prompts = [t.format(t=topic) for topic in TOPICS for t in rng.sample(CHAT_TEMPLATES, 3)]
    prompts += ADVICE + CODE_OTHER
    prompts += [t.format(t=task) for task in CODE_TASKS for t in rng.sample(CODE_TEMPLATES, 2)]
    prompts += [rng.choice(SUMMARY_TEMPLATES).format(t=p) for p in rng.sample(passages, 40)]
    prompts += maths_prompts(rng, 60)
    held_out = {p for ps in EVAL_PROMPTS.values() for p in ps}
    prompts = [p for p in dict.fromkeys(prompts) if p not in held_out]
    rng.shuffle(prompts)
    return prompts


# --- offline text -----------------------------------------------------------------------------------


def offline_documents(rng: random.Random) -> list[str]:
    """Text every install of this project has: Python's documentation topics and standard library
    source, and the package descriptions (READMEs) of the installed distributions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    docs = []
    topics = stdlib / "pydoc_data" / "topics.py"
    if topics.exists():
        ns = {}
        exec(compile(topics.read_text(), str(topics), "exec"), ns)  # a dict literal of doc strings
        docs += [v for _, v in sorted(ns["topics"].items())]
    for meta in sorted(purelib.glob("*.dist-info/METADATA")):
        text = meta.read_text(errors="ignore")
        body = text.split("\n\n", 1)[-1]  # drop the e-mail style header
        if len(body) > 2000:
            docs.append(body)
    for src in sorted(stdlib.glob("*.py")):
        text = src.read_text(errors="ignore")
        if 3000 < len(text) < 200_000:
            docs.append(text)
    rng.shuffle(docs)
    return docs


def passages_from(docs: list[str]) -> list[str]:
    """Prose paragraphs of 300-900 characters to summarise."""
    out = []
    for d in docs:
        for par in d.split("\n\n"):
            par = " ".join(par.split())
            if 300 < len(par) < 900 and par.count(" ") > 40 and not any(c in par for c in "{}[]=()>"):
                out.append(par)
    return out


# --- the teacher ------------------------------------------------------------------------------------


def topk_logprobs(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits.float(), dim=-1)
    v, i = torch.topk(lp, k, dim=-1)
    return v.half(), i.int()


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new: int, stop_ids, k: int, temperature, gen):
    """Answer a batch of prompts at once (left-padded, pads masked) and keep the teacher's top-k at
    every position. Returns per prompt (ids, topk_lp, topk_ids, n_prompt)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new
    model.setup_caches(B, S)
    idx = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, P - len(p) :] = torch.tensor(p)
        valid[b, P - len(p) :] = True
    valid[:, P:] = True
    eye = torch.eye(S, dtype=torch.bool)

    def mask(pos):
        # Real queries see real keys only; a pad query sees itself too, so no softmax row is empty
        # (an all -inf row gives NaN, which would then leak through the cache).
        return (model.causal_mask[pos][None] & (valid[:, None, :] | eye[pos][None]))[:, None]

    pos = torch.arange(P)
    logits = model(idx, pos, mask(pos))
    first = topk_logprobs(logits, k)  # predictions at the prompt positions
    steps = []  # predictions after each generated token, [B, k] per step
    out = [list(p) for p in prompts]
    done = [False] * B
    last = logits[:, -1]
    for step in range(max_new):
        if temperature == 0:
            nxt = sampling.greedy(last)
        else:
            nxt = sampling.sample(sampling.probs(last, temperature, top_p=0.95), gen)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = out[b][-1] in stop_ids
        if all(done) or step == max_new - 1:
            break
        # Rows already done keep decoding garbage until the batch ends; it is cut off below.
        pos = torch.tensor([P + step])
        last = model(nxt.view(B, 1), pos, mask(pos))[:, -1]
        steps.append(topk_logprobs(last, k))
    res = []
    for b, p in enumerate(prompts):
        n_gen = len(out[b]) - len(p)
        # A sequence of n tokens has n - 1 next-token predictions: all the prompt's, then one after
        # each generated token but the last.
        lp = torch.cat([first[0][b, P - len(p) :]] + [v[b : b + 1] for v, _ in steps[: n_gen - 1]])
        ti = torch.cat([first[1][b, P - len(p) :]] + [i[b : b + 1] for _, i in steps[: n_gen - 1]])
        res.append((torch.tensor(out[b]), lp, ti, len(p)))
    return res


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), bos=tok.add_bos)


def stage_data(s: Settings):
    rng = random.Random(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    stop_ids = set(int(i) for i in tok.stop_ids)
    docs = offline_documents(rng)
    prompts = training_prompts(rng, passages_from(docs))
    jobs = [(p, 0.0) for p in prompts] + [(p, 0.8) for p in prompts if rng.random() < s.sampled_fraction]
    print(f"{len(prompts)} training prompts, {len(jobs)} answers to generate", flush=True)
    # Similar lengths together (less padding to compute); one temperature per batch.
    jobs = sorted((temp, len(ids), ids) for ids, temp in ((chat_ids(tok, p), t) for p, t in jobs))
    batches = [jobs[i : i + s.gen_batch] for i in range(0, len(jobs), s.gen_batch)]
    batches = [[j for j in b if j[0] == t] for b in batches for t in sorted({j[0] for j in b})]
    seqs, t0 = [], time.time()
    for batch in batches:
        ids = [j[2] for j in batch]
        for seq_ids, lp, ti, n_prompt in generate_batch(
            model, ids, s.gen_new_tokens, stop_ids, s.topk, batch[0][0], gen
        ):
            seqs.append({"ids": seq_ids, "lp": lp, "ti": ti, "n_prompt": n_prompt, "kind": "chat"})
        n_tok = sum(len(x["ids"]) for x in seqs)
        print(
            f"  generated {len(seqs)}/{len(jobs)} answers, {n_tok} tokens, {time.time() - t0:.0f} s",
            flush=True,
        )
    if seqs:
        print("  sample answer:", repr(tok.decode(seqs[0]["ids"][seqs[0]["n_prompt"] :].tolist())[:300]))
    # Offline text, teacher-forced in chunks.
    chunks, n = [], 0
    for d in docs:
        ids = tok.encode(d, bos=False)
        for j in range(0, len(ids) - 64, s.offline_chunk):
            chunks.append(ids[j : j + s.offline_chunk])
            n += len(chunks[-1])
            if n >= s.offline_tokens:
                break
        if n >= s.offline_tokens:
            break
    t0 = time.time()
    model.setup_caches(1, 8)  # drop the big generation caches
    for j in range(0, len(chunks), 8):
        batch = [c for c in chunks[j : j + 8] if len(c) == s.offline_chunk]
        if not batch:
            continue
        with torch.no_grad():
            lp, ti = topk_logprobs(model(torch.tensor(batch)), s.topk)
        for b, c in enumerate(batch):
            seqs.append({"ids": torch.tensor(c), "lp": lp[b], "ti": ti[b], "n_prompt": 0, "kind": "text"})
    print(f"  teacher-forced {n} tokens of offline text in {time.time() - t0:.0f} s", flush=True)
    torch.save(seqs, work / "data.pt")
    print(f"saved {len(seqs)} sequences to {work / 'data.pt'}")


# --- training ---------------------------------------------------------------------------------------


def frequent_tokens(seqs, n_subset: int, vocab: int, always=()) -> torch.Tensor:
    """The n_subset most frequent token ids of the training data (the tokens the target writes and
    the text it reads), counting both the text and the teacher's argmax; special tokens always in."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for x in seqs:
        counts += torch.bincount(x["ids"], minlength=vocab)
        counts += torch.bincount(x["ti"][:, 0].long(), minlength=vocab)
    for i in always:
        counts[i] = counts.max() + 1
    # Stable ordering: by count, ties by id; then sorted ids for a tidy index.
    order = sorted(range(vocab), key=lambda i: (-int(counts[i]), i))[:n_subset]
    return torch.tensor(sorted(order), dtype=torch.long)


def make_batches(seqs, s: Settings, rng: random.Random):
    """Sequences of similar length together, about batch_tokens tokens per batch."""
    seqs = sorted(seqs, key=lambda x: min(len(x["ids"]), s.max_len))
    batches, cur = [], []
    for x in seqs:
        cur.append(x)
        if len(cur) * min(len(cur[-1]["ids"]), s.max_len) >= s.batch_tokens:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(batch, s: Settings, full_to_sub: torch.Tensor):
    T = min(max(len(x["ids"]) for x in batch), s.max_len)
    B, K = len(batch), batch[0]["lp"].shape[-1]
    ids = torch.zeros(B, T, dtype=torch.long)
    lp = torch.full((B, T, K), -1e4)
    ti = torch.zeros(B, T, K, dtype=torch.long)
    w = torch.zeros(B, T)
    for b, x in enumerate(batch):
        n = min(len(x["ids"]), T)
        m = min(x["lp"].shape[0], n)
        ids[b, :n] = x["ids"][:n]
        lp[b, :m] = x["lp"][:m].float()
        ti[b, :m] = x["ti"][:m].long()
        w[b, :m] = 1.0
        if x["kind"] == "chat":  # positions before the last prompt token predict the prompt itself
            w[b, : min(x["n_prompt"] - 1, m)] = s.prompt_weight
    sub = full_to_sub[ti]  # teacher's top-k in subset coordinates (-1: outside the subset)
    p = lp.exp() * (sub >= 0)
    return ids, p, sub.clamp(min=0), w


def subset_logits(student, ids):
    """The student's forward (no cache) up to its subset head's logits, without the scatter into the
    full vocabulary that its forward does for callers."""
    x = student.tok_embeddings(ids)
    freqs = rope_table(student.config, ids.shape[1])
    for layer in student.layers:
        x = layer(x, freqs, None, None)
    return F.linear(student.norm(x), student.output.weight)


def distill_loss(student, ids, p, sub, w, hard_weight):
    logq = torch.log_softmax(subset_logits(student, ids), dim=-1)
    lq = logq.gather(-1, sub)
    soft = -(p * lq).sum(-1)  # cross-entropy against the teacher's top-k
    hard = -lq[..., 0]  # the target's argmax (top-1 of the teacher, when in the subset)
    hard = torch.where(p[..., 0] > 0, hard, torch.zeros_like(hard))
    agree = (logq.argmax(-1) == sub[..., 0]) & (p[..., 0] > 0)
    loss = ((soft + hard_weight * hard) * w).sum() / w.sum()
    return loss, float((agree * (w > 0)).sum() / (w > 0).sum())


def stage_train(s: Settings):
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    work = Path(s.workdir)
    seqs = torch.load(work / "data.pt", weights_only=True)
    target, tok = load_model()
    vocab = target.config.vocab_size
    subset = frequent_tokens(seqs, s.n_subset, vocab, always=list(tok.stop_ids))
    full_to_sub = torch.full((vocab,), -1, dtype=torch.long)
    full_to_sub[subset] = torch.arange(len(subset))
    student = student_from_target(target, s.source_layers, subset)
    params = [p for n, p in student.named_parameters() if not n.startswith(("tok_embeddings", "output"))]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    print(f"student: layers {s.source_layers} of the target, {n_params / 1e6:.2f}M trained parameters, "
          f"head over {len(subset)} tokens", flush=True)  # fmt: skip
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    student.train()
    batches, bi = make_batches(seqs, s, rng), 0
    t0, step, total, step_times = time.time(), 0, s.steps, []
    log = []
    while step < total:
        if bi == len(batches):
            batches, bi = make_batches(seqs, s, rng), 0
        ids, p, sub, w = collate(batches[bi], s, full_to_sub)
        bi += 1
        # Warmup, then cosine to 10%. The schedule's length is `steps`, or what fits in the time limit
        # at the recent pace (re-estimated every step, so a busy machine shortens the run smoothly).
        now = time.time()
        if step >= 10:
            pace = (now - step_times[-10]) / 10
            total = max(step + 1, min(s.steps, step + int((s.time_limit_s - (now - t0)) / pace)))
        step_times.append(now)
        frac = min(1.0, step / max(1, total - 1))
        lr = s.lr * min(1.0, (step + 1) / s.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, agree = distill_loss(student, ids, p, sub, w, s.hard_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        log.append((step, loss.item(), agree))
        if step % 10 == 0 or step == total:
            m = log[-10:]
            print(f"  step {step}/{total}  loss {sum(x[1] for x in m) / len(m):.3f}  "
                  f"agree {sum(x[2] for x in m) / len(m):.3f}  lr {lr:.2e}  {time.time() - t0:.0f} s",
                  flush=True)  # fmt: skip
    train_s = time.time() - t0
    student.eval()
    settings = asdict(s) | {"steps_run": step, "train_wall_s": round(train_s), "trained_params": n_params}
    out = ROOT / s.out
    save_tiny(student, target, s.source_layers, out, bits=s.delta_bits, meta=settings)
    (out.parent / "distill_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {train_s:.0f} s of training")


# --- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def ms_per_forward(model, T=1, n=30) -> float:
    """ms per cached forward of T tokens (T=1: one decode step), after a warm-up."""
    model.setup_caches(1, 256)
    x = torch.ones(1, T, dtype=torch.long)
    for _ in range(3):
        model(x, torch.arange(T))
    t = time.perf_counter()
    for i in range(n):
        model(x, torch.arange(8 + i * T % 200, 8 + i * T % 200 + T))
    return 1e3 * (time.perf_counter() - t) / n


def expected_speedup(a: float, c: float, k: int, v: float) -> float:
    """NOTES.md cost model: tokens per round / cost per round, in target steps."""
    tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
    return tokens / (k * c + v)


@torch.no_grad()
def stage_eval(s: Settings, new_tokens: int = 96):
    """Greedy agreement and sampling acceptance (temperature 1: the mean of sum_x min(p, q)) on the
    target's own greedy answers to the held-out prompts, latencies, and the cost model's estimate."""
    from speculate import ModelLevel, autoregressive_decode

    target, tok = load_model()
    draft = load_tiny(target, ROOT / s.out)
    assert draft.tok_embeddings.weight is target.tok_embeddings.weight
    # The same trained layers with the target's full head (no FR-Spec), and the untrained early exit.
    full_head = student_from_target(target, list(range(len(draft.layers))), None)
    full_head.layers, full_head.norm = draft.layers, draft.norm
    early = student_from_target(target, list(range(len(draft.layers))), None)  # untrained, same depth
    models = {"tiny": draft, "tiny_full_head": full_head, "early_exit": early}
    counts = {name: {} for name in models}
    in_subset = total = 0
    for kind, prompts in EVAL_PROMPTS.items():
        for prompt in prompts:
            ids = torch.tensor(chat_ids(tok, prompt))
            out, _ = autoregressive_decode(ModelLevel(target), ids, new_tokens, stop_ids=tok.stop_ids)
            seq = torch.cat([ids, out])[None]
            P = ids.numel()
            p = torch.softmax(target(seq)[0, P - 1 : -1], -1)
            t_arg = p.argmax(-1)  # the target's greedy choices (== out)
            in_subset += int(torch.isin(t_arg, draft.output.ids).sum())
            total += t_arg.numel()
            for name, m in models.items():
                q = torch.softmax(m(seq)[0, P - 1 : -1], -1)
                c = counts[name].setdefault(kind, [0, 0.0, 0])
                c[0] += int((q.argmax(-1) == t_arg).sum())
                c[1] += float(torch.minimum(p, q).sum())
                c[2] += t_arg.numel()
    report = {"threads": torch.get_num_threads(), "new_tokens_per_prompt": new_tokens, "positions": total,
              "target_argmax_in_head_subset": in_subset / total}  # fmt: skip
    # Timings interleaved over several rounds, the best of each kept: on a shared CPU, other jobs only
    # ever slow a measurement down, and interleaving keeps the ratios fair.
    timed = {name: (m, 1) for name, m in models.items()}
    timed |= {"target": (target, 1)} | {f"verify{k}": (target, k + 1) for k in (2, 4, 6)}
    best = {name: float("inf") for name in timed}
    for _ in range(5):
        for name, (m, T) in timed.items():
            best[name] = min(best[name], ms_per_forward(m, T))
    t_ms, v_ms = best["target"], {k: best[f"verify{k}"] for k in (2, 4, 6)}
    report["target_ms"] = t_ms
    report["target_verify_ms"] = {f"T={k + 1}": v for k, v in v_ms.items()}
    for name in models:
        ms = best[name]
        agree = sum(c[0] for c in counts[name].values()) / total
        accept = sum(c[1] for c in counts[name].values()) / total
        speedups = {f"k={k}": expected_speedup(agree, ms / t_ms, k, v_ms[k] / t_ms) for k in v_ms}
        report[name] = {
            "greedy_agreement": agree,
            "sampling_acceptance_t1": accept,
            "by_kind": {
                kind: {"greedy": c[0] / c[2], "sampling_t1": c[1] / c[2]} for kind, c in counts[name].items()
            },
            "ms_per_token": ms,
            "cost_ratio_c": ms / t_ms,
            "estimated_greedy_speedup": speedups,
        }
    print(json.dumps(report, indent=2))
    ((ROOT / s.out).parent / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["data", "train", "eval", "all"])
    for f in Settings.__dataclass_fields__.values():
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if isinstance(default, list):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, nargs="+", default=default)
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    a = ap.parse_args(argv)
    s = Settings(**{k: getattr(a, k) for k in Settings.__dataclass_fields__})
    torch.set_num_threads(s.threads)
    print("settings:", json.dumps(asdict(s)), flush=True)
    if a.stage in ("data", "all"):
        stage_data(s)
    if a.stage in ("train", "all"):
        stage_train(s)
    if a.stage in ("eval", "all"):
        stage_eval(s)


if __name__ == "__main__":
    main()
