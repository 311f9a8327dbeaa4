"""Train the feature head (head.py) of the embedded SmolLM2-135M-Instruct, on the CPU, offline.

    python scripts/distill_tiny.py data      # once: the target's own answers + offline text (WORKDIR)
    python scripts/train_head.py             # -> heads/smollm2-135m-head.pth (+ settings, log)

The data are `distill_tiny.py data`'s, so that the head and the standalone `tiny` student learn from
the same text with the same time budget (a fair comparison: `--time-limit-s` here, `--time-limit-s`
there). What this script does, and why:

  features  The target reads every training sequence once (teacher forcing, no cache) and its
            final-normed hidden states are kept (bf16, ~1.1 KB per token): the head's input and its
            regression target. The target's next-token distribution is recomputed from them when
            needed (it is the output head applied to the feature), so nothing else is stored.
  train     EAGLE's losses: smooth-L1 between the predicted and the true next feature, plus the
            cross-entropy of the head's q against the target's p, both over the FR-Spec vocabulary
            subset (the N_SUBSET most frequent tokens of the data, the only ones the head can draft).
            Training-time test (EAGLE-3; HASS is alike): the head is unrolled UNROLL steps. At step d
            position t reads the head's own step d-1 prediction of feature t-1, and attends, as it
            will when drafting the d-th token of a round, to the keys of positions up to t-d+1 from
            step 1 (true features) and to one key of each later step on the diagonal. Without this
            the head only ever sees true features and its acceptance collapses after the first
            drafted token. Steps are weighted DECAY^(d-1). (The regression is a mean over the
            feature's dims, as EAGLE's: summed, it outweighed the cross-entropy ~500 to 1 and the
            head's argmax learnt slowly.)

Settings go into the artifact and next to it (heads/train_settings.json), the loss log to
heads/train_log.json. Use one thread (`--threads 1`, the default) on a shared machine.
"""

import argparse
import json
import math
import random
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import load_model
from head import HEAD_ARTIFACT, FeatureHead, head_args, save_head
from model import apply_rope, rope_table
from tiny import SubsetHead

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    seed: int = 0
    workdir: str = "/tmp/specqd_tiny"  # distill_tiny.py's data
    out: str = str(HEAD_ARTIFACT.relative_to(ROOT))
    threads: int = 1
    n_subset: int = 8192  # FR-Spec head: the draft step reads len/vocab of the output head's bytes
    max_len: int = 384
    batch_tokens: int = 1024
    unroll: int = 3
    decay: float = 0.8
    reg_weight: float = 1.0
    ce_weight: float = 1.0
    prompt_weight: float = 0.3  # loss weight of positions inside the prompt (drafts mostly see answers)
    lr: float = 1e-3
    warmup: int = 30
    steps: int = 5000  # an upper bound: the time limit decides
    time_limit_s: float = 2400.0  # training stops (cosine schedule squeezed) past this wall time


def init_head(head: FeatureHead):
    """Start as "the next feature is the last one": fc passes the feature through (identity on its
    feature half, small on the embedding half) and the layer's two output projections start small, so
    the first loss is the distance between neighbouring features, not a blow-up. (Starting from the
    target's last layer instead blew up: its MLP expects a normed residual stream and its outputs are
    huge.)"""
    D = head.config.dim
    with torch.no_grad():
        head.fc.weight[:, :D].mul_(0.1)
        head.fc.weight[:, D:].copy_(torch.eye(D))
        head.fc.bias.zero_()
        head.attention.wo.weight.mul_(0.1)
        head.feed_forward.w2.weight.mul_(0.1)


def frequent_tokens(seqs, n: int, vocab: int, always=()) -> torch.Tensor:
    counts = torch.zeros(vocab, dtype=torch.long)
    for x in seqs:
        counts += torch.bincount(x["ids"], minlength=vocab)
    for i in always:
        counts[i] = counts.max() + 1
    order = sorted(range(vocab), key=lambda i: (-int(counts[i]), i))[:n]
    return torch.tensor(sorted(order), dtype=torch.long)


@torch.no_grad()
def extract_features(target, seqs, max_len: int):
    """The target's final-normed hidden states for every sequence (cut to max_len), bf16."""
    t0, n = time.time(), 0
    for i, x in enumerate(seqs):
        ids = x["ids"][:max_len]
        target(ids.view(1, -1))
        x["feat"] = target.features[0].to(torch.bfloat16)
        n += ids.numel()
        if (i + 1) % 200 == 0:
            print(
                f"  features: {i + 1}/{len(seqs)} sequences, {n} tokens, {time.time() - t0:.0f} s", flush=True
            )
    print(f"features of {n} tokens in {time.time() - t0:.0f} s", flush=True)


def make_batches(seqs, s: Settings, rng: random.Random):
    seqs = sorted(seqs, key=lambda x: len(x["feat"]))
    batches, cur = [], []
    for x in seqs:
        cur.append(x)
        if len(cur) * len(cur[-1]["feat"]) >= s.batch_tokens:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(batch, s: Settings):
    T = max(len(x["feat"]) for x in batch)
    B, D = len(batch), batch[0]["feat"].shape[-1]
    ids = torch.zeros(B, T, dtype=torch.long)
    feat = torch.zeros(B, T, D)
    w = torch.zeros(B, T)
    for b, x in enumerate(batch):
        n = len(x["feat"])
        ids[b, :n] = x["ids"][:n]
        feat[b, :n] = x["feat"].float()
        w[b, : n - 1] = 1.0  # the last position has no next token to predict
        if x["kind"] == "chat":
            w[b, : max(0, x["n_prompt"] - 1)] = s.prompt_weight
    return ids, feat, w


def unrolled_loss(head: FeatureHead, ids, feat, w, s: Settings):
    """EAGLE's losses over UNROLL steps of training-time test (see the module docstring).
    Head position t (0-based over the sequence's positions 1..T-1) reads token ids[t+1] and feature
    t of the sequence, and predicts feature t+1."""
    c, att = head.config, head.attention
    B, T, D = feat.shape
    emb = head.tok_embeddings(ids[:, 1:]).float()
    target = feat[:, 1:]  # what position t predicts
    weight = w[:, 1:]
    with torch.no_grad():
        p = torch.softmax(F.linear(target, head.output.weight.float()), -1)
    freqs = rope_table(c, T - 1)
    n = T - 1
    keys, values = [], []  # per step: [B, H, n, hd] (already repeated over the GQA groups)
    prev = feat[:, :-1]
    total, stats = 0.0, []
    scale = 1.0 / math.sqrt(c.head_dim)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for d in range(1, s.unroll + 1):
        x = head.fc(torch.cat([emb, prev], -1))
        q_size, kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
        q, k, v = att.wqkv(x).split([q_size, kv_size, kv_size], -1)
        q = apply_rope(q.view(B, n, c.n_head, c.head_dim).transpose(1, 2), freqs)
        k = apply_rope(k.view(B, n, c.n_local_heads, c.head_dim).transpose(1, 2), freqs)
        v = v.view(B, n, c.n_local_heads, c.head_dim).transpose(1, 2)
        rep = c.n_head // c.n_local_heads
        keys.append(k.repeat_interleave(rep, 1))
        values.append(v.repeat_interleave(rep, 1))
        # Step 1's keys up to t-d+1, then one key per later step on its diagonal, t-(d-j).
        main = (q @ keys[0].transpose(-1, -2)) * scale
        main = main.masked_fill(~causal.tril(-(d - 1)), float("-inf"))
        diag = []
        for j in range(2, d + 1):
            kj = torch.roll(keys[j - 1], d - j, 2)  # row t holds key t-(d-j)
            diag.append((q * kj).sum(-1, keepdim=True) * scale)
        scores = torch.cat([main] + diag, -1)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        y = probs[..., :n] @ values[0]
        for j in range(2, d + 1):
            vj = torch.roll(values[j - 1], d - j, 2)
            y = y + probs[..., n + j - 2 : n + j - 1] * vj
        h = x + att.wo(y.transpose(1, 2).reshape(B, n, q_size))
        h = h + head.feed_forward(head.ffn_norm(h))
        # Positions t < d-1 have no round of depth d behind them (their diagonal keys wrapped around).
        valid = weight.clone()
        valid[:, : d - 1] = 0.0
        reg = F.smooth_l1_loss(h, target, reduction="none").mean(-1)  # EAGLE's: a mean over dims
        logq = torch.log_softmax(F.linear(h, head.output.weight.float()), -1)
        ce = -(p * logq).sum(-1)
        loss = ((s.reg_weight * reg + s.ce_weight * ce) * valid).sum() / valid.sum().clamp(min=1)
        total = total + s.decay ** (d - 1) * loss
        agree = ((logq.argmax(-1) == p.argmax(-1)).float() * (valid > 0)).sum() / (valid > 0).sum().clamp(
            min=1
        )
        stats.append(float(agree))
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)  # step d+1 at t reads h at t-1
    return total, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    s = Settings(**vars(ap.parse_args(argv)))
    print("settings:", json.dumps(asdict(s)), flush=True)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)

    seqs = torch.load(Path(s.workdir) / "data.pt", weights_only=True)
    # The bf16 weights the head will read features of, computed in fp32 (torch's fp32 GEMMs are the
    # fast ones on a CPU; the features differ from a bf16 run's by activation rounding only).
    target, tok = load_model(dtype=torch.bfloat16)
    target = target.float()
    t_start = time.time()
    cache = Path(s.workdir) / f"features_{s.max_len}.pt"
    if cache.exists():  # the same data and target: the features do not change between runs
        for x, f in zip(seqs, torch.load(cache, weights_only=True)):
            x["feat"] = f
    else:
        extract_features(target, seqs, s.max_len)
        torch.save([x["feat"] for x in seqs], cache)
    vocab = target.config.vocab_size
    subset = frequent_tokens(seqs, s.n_subset, vocab, always=list(tok.stop_ids))
    counts = torch.zeros(vocab)
    for x in seqs:
        counts += torch.bincount(x["ids"], minlength=vocab)
    cover = float(counts[subset].sum() / counts.sum())
    print(f"FR-Spec subset: {len(subset)} tokens cover {cover:.4f} of the data's tokens", flush=True)

    head = FeatureHead(
        head_args(target.config), target.tok_embeddings, SubsetHead(target.output.weight, subset)
    )
    init_head(head)
    params = [p for n, p in head.named_parameters() if not n.startswith(("tok_embeddings", "output"))]
    for p in head.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    print(f"head: {n_params / 1e6:.2f}M trained parameters, output over {len(subset)} tokens", flush=True)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.95))

    batches, bi = make_batches(seqs, s, rng), 0
    t0, step, total, times, log = time.time(), 0, s.steps, [], []
    while step < total:
        if bi == len(batches):
            batches, bi = make_batches(seqs, s, rng), 0
        ids, feat, w = collate(batches[bi], s)
        bi += 1
        now = time.time()
        if step >= 10:  # the schedule's length: what fits in the time limit at the recent pace
            pace = (now - times[-10]) / 10
            total = max(step + 1, min(s.steps, step + int((s.time_limit_s - (now - t0)) / pace)))
        times.append(now)
        frac = min(1.0, step / max(1, total - 1))
        lr = s.lr * min(1.0, (step + 1) / s.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, agree = unrolled_loss(head, ids, feat, w, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        log.append([step, round(loss.item(), 4)] + [round(a, 4) for a in agree])
        if step % 10 == 0 or step == total:
            m = log[-10:]
            ag = " ".join(f"{sum(x[2 + d] for x in m) / len(m):.3f}" for d in range(s.unroll))
            print(f"  step {step}/{total}  loss {sum(x[1] for x in m) / len(m):.3f}  agree by step {ag}  "
                  f"lr {lr:.2e}  {time.time() - t0:.0f} s", flush=True)  # fmt: skip
    train_s = time.time() - t0
    settings = asdict(s) | {
        "steps_run": step, "train_wall_s": round(train_s), "features_wall_s": round(t0 - t_start),
        "trained_params": n_params, "data_tokens": sum(len(x["feat"]) for x in seqs),
    }  # fmt: skip
    out = ROOT / s.out
    save_head(head.to(torch.bfloat16), out, meta=settings)
    (out.parent / "train_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (out.parent / "train_log.json").write_text(json.dumps(log) + "\n")
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {train_s:.0f} s of training")


if __name__ == "__main__":
    main()
