"""Draw one generation's verification rounds as a PNG: who proposed which tokens, which were kept.

    python scripts/show_rounds.py                                   # mxfp4:4,tiny:2 on the embedded model
    python scripts/show_rounds.py --levels ngram:3 --out results/rounds_ngram.png
    python scripts/show_rounds.py --levels tiny:3:tree --prompt "Write a haiku about GPUs."

x is the position in the output. The top row is the output itself, each token in the colour of the
level that produced it. Below it, one band per level that verifies (level i checks what level i+1
proposes; the last model level takes plain steps). Each round of a band is one lane: its proposals on
top, green where level i accepted them and red where it rejected them (a strip under each names the
level that produced it), and under them the token level i added itself: the correction that replaced
the first rejected token, or the bonus after all were accepted. Rounds that overlap take separate
lanes. A tree round shows the path that was accepted and the tree's size.
"""

import argparse
from pathlib import Path

import torch

from accel import accelerate
from checkpoint import load_model
from levels import DTYPES, build_levels, default_dtype, parse_levels, tree_shape
from speculate import format_stats, speculative_decode

ACCEPTED, REJECTED = "#9ed99f", "#f2a3a3"
LEVEL_COLOURS = ("#8fbfe8", "#f7d274", "#c9a0dc", "#a0d9d4", "#f0b48a")


def token_label(tok, t: int, width: int) -> str:
    """A token's text for a box `width` characters wide: whitespace made visible, long ones cut."""
    text = tok.decode([t]).replace("\ufffd", "?")
    shown = text.strip() or text.replace("\n", "\\n").replace(" ", "·") or "?"
    shown = shown.replace("\n", "\\n")
    return shown if len(shown) <= width else shown[: max(width - 1, 1)] + "…"


def lanes_of(rounds: list[dict], P: int) -> list[int]:
    """A lane per round, the first whose last box ends before this round starts (in trace order)."""
    ends, lanes = [], []
    for r in rounds:
        start, end = r["pos"] - P, r["pos"] - P + max(len(r["proposed"]), r["accepted"] + 1)
        lane = next((i for i, e in enumerate(ends) if e <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        ends[lane] = end
        lanes.append(lane)
    return lanes


def verified(r: dict) -> bool:
    """A verification round (something was proposed: a sequence, or a tree, whose `proposed` is only the
    accepted path), not a plain step."""
    return bool(r["proposed"] or r["nodes"])


def draw(trace, out_ids, origin, names, P, added, tok, title, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    n = len(out_ids)
    box_in, fontsize = 0.46, 7
    chars = int(box_in / (0.62 * fontsize / 72))
    keep = [k for k, r in enumerate(trace) if verified(r)]  # plain steps are no verification rounds
    trace, added = [trace[k] for k in keep], [added[k] for k in keep]
    bands = sorted({r["level"] for r in trace})
    lanes = {i: lanes_of([r for r in trace if r["level"] == i], P) for i in bands}
    rows = 1.4 + sum(max(lanes[i]) + 1 for i in bands) * 1.9 + 0.8 * len(bands)
    fig, ax = plt.subplots(figsize=(2.6 + box_in * max(n, 8), 1.3 + 0.36 * rows))
    colour = lambda level: LEVEL_COLOURS[level % len(LEVEL_COLOURS)]  # noqa: E731

    def box(x, y, h, face, text, size=fontsize, strip=None):
        ax.add_patch(Rectangle((x + 0.04, y), 0.92, h, facecolor=face, edgecolor="#555", lw=0.5))
        if strip is not None:  # the level that produced this proposal
            ax.add_patch(
                Rectangle((x + 0.04, y + h - 0.16), 0.92, 0.16, facecolor=colour(strip), edgecolor="none")
            )
        ax.text(x + 0.5, y + h / 2 - (0.06 if strip is not None else 0), text, ha="center", va="center",
                fontsize=size, family="DejaVu Sans")  # fmt: skip

    y, ticks = 0.0, []
    for t, (tid, o) in enumerate(zip(out_ids, origin)):
        box(t, y, 1.0, colour(o), token_label(tok, tid, chars))
    ticks.append((y + 0.5, "output\n(colour: level that\nproduced the token)"))
    y += 1.4
    for i in bands:
        rounds = [(r, added[k]) for k, r in enumerate(trace) if r["level"] == i]
        depth = max(lanes[i]) + 1
        top = y
        for (r, nxt), lane in zip(rounds, lanes[i]):
            ly, x0 = y + lane * 1.9, r["pos"] - P
            for j, (t, by) in enumerate(zip(r["proposed"], r["by"])):
                box(
                    x0 + j,
                    ly,
                    1.0,
                    ACCEPTED if j < r["accepted"] else REJECTED,
                    token_label(tok, t, chars),
                    strip=by,
                )
            width = max(len(r["proposed"]), r["accepted"] + 1)  # a frame around each round
            ax.add_patch(
                Rectangle((x0 + 0.01, ly - 0.05), width - 0.02, 1.9, fill=False, edgecolor="#333", lw=1.0)
            )
            if nxt is not None:
                box(
                    x0 + r["accepted"], ly + 1.0, 0.8, colour(i), token_label(tok, nxt, chars), fontsize - 0.5
                )
            if r["nodes"]:
                ax.text(
                    x0 - 0.1,
                    ly + 0.5,
                    f"tree {r['nodes']}",
                    ha="right",
                    va="center",
                    fontsize=6,
                    color="#555",
                )
        y += depth * 1.9
        ticks.append(((top + y) / 2, f"level {i} {names[i]}\nverifies level {i + 1}\n{names[i + 1]}"))
        ax.axhline(y + 0.4, color="#bbb", lw=0.6)
        y += 0.8
    ax.set_xlim(-0.5, max(n, 8) + 0.5)
    ax.set_ylim(y, -0.3)
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xticks(range(0, n + 1, 4))
    ax.set_xlabel("position in the output (tokens)")
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    legend = [Patch(facecolor=ACCEPTED, edgecolor="#555", label="proposed, accepted"),
              Patch(facecolor=REJECTED, edgecolor="#555", label="proposed, rejected")]  # fmt: skip
    legend += [Patch(facecolor=colour(i), label=f"level {i} {nm}") for i, nm in enumerate(names)]
    key = (
        "a level's colour: the tokens it\nadded (lower boxes), and the strip\nunder the proposals it produced"
    )
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
              title=key, title_fontsize=7)  # fmt: skip
    ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Explain speculative decoding in two sentences.")
    p.add_argument("--levels", default="mxfp4:4,tiny:2", help="the drafts, top-down (levels.parse_levels)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--out", type=Path, default=Path("results/rounds.png"))
    a = p.parse_args(argv)
    specs = parse_levels(a.levels)
    device = torch.device(a.device)
    dtype = default_dtype(device, a.kernels) if a.dtype == "auto" else DTYPES[a.dtype]
    model, tok = load_model(a.checkpoint, device, dtype)
    print(accelerate(model, enabled=a.kernels))
    levels = build_levels(model, tok, specs, device, dtype, kernels=a.kernels)
    shape = tree_shape(device)
    trees = [shape if s.tree else None for s in specs]
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
    ids = torch.tensor(tok.encode(text, bos=tok.add_bos))
    out, st = speculative_decode(
        levels, ids, a.max_new_tokens, k=[s.k for s in specs], temperature=a.temperature,
        generator=torch.Generator(device=device).manual_seed(a.seed), stop_ids=tok.stop_ids,
        trees=trees if any(trees) else None, trace=True,
    )  # fmt: skip
    print(format_stats(st))
    print(repr(tok.decode(out.tolist())))
    P = ids.numel()
    names, rounds = [lv.name for lv in levels], [r for r in st.trace if r["level"] == 0]
    title = (
        f"{a.levels} on {a.checkpoint or 'SmolLM2-135M-Instruct'}, "
        f"{'greedy' if a.temperature == 0 else f'T = {a.temperature:g}'}, {len(out)} tokens; the target ran "
        f"{sum(map(verified, rounds))} verification rounds and "
        f"{sum(not verified(r) for r in rounds)} plain steps; prompt: {a.prompt!r}"
    )
    added = [r["token"] for r in st.trace]
    draw(st.trace, out.tolist(), st.origin, names, P, added, tok, title, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
