"""accel.py: kernel-backed twins swapped in from outside, and an edit to model.py that always shows.

A student who edits model.py must see the edit run: either the twins still mirror the edited code, or
accelerate() leaves the twins of the edited function off and says so."""

import copy

import pytest
import torch

import accel
import generate
import model as M
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_local_heads=2, dim=128)
    return Transformer(args).to(dtype).eval().requires_grad_(False)


def cached_logits(model, ids):
    model.setup_caches(1, 64)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]))


def test_fingerprints_match_model_py():
    """The twins mirror model.py as shipped. After a deliberate change to a mirrored function, change
    its twin (and the C++) to match, then put the printed fingerprints in accel.FINGERPRINTS."""
    current = {n: accel.source_fingerprint(accel._resolve(n)) for n in accel.FINGERPRINTS}
    assert accel.edited_functions() == [], f"new fingerprints: {current}"


def test_fingerprint_ignores_comments_and_docstrings_only():
    def documented():
        def f(x):
            """doc"""
            return x + 1  # a comment

        return f

    def commented():
        def f(x):
            # another comment
            return x + 1

        return f

    def changed():
        def f(x):
            return x + 2

        return f

    fp = [accel.source_fingerprint(make()) for make in (documented, commented, changed)]
    assert fp[0] == fp[1] != fp[2]
    assert accel.source_fingerprint(len) is None  # no source: counted as edited


def test_accelerate_swaps_classes_in_place_and_back():
    model = small()
    params = {n: p for n, p in model.named_parameters()}
    report = accel.accelerate(model)
    if not report.kernels:
        pytest.skip(f"CPU kernels unavailable: {report.reason}")
    assert type(model.layers[0]) is accel.FastBlock and type(model.output) is accel.FastLinear
    assert report.swapped["FastBlock"] == 2 and not report.edited
    assert all(p is params[n] for n, p in model.named_parameters())  # no copies
    again = accel.accelerate(model)  # idempotent
    assert again.swapped == report.swapped
    accel.accelerate(model, enabled=False)
    assert type(model.layers[0]) is M.TransformerBlock and type(model.output) is torch.nn.Linear
    assert "runs as written" in str(accel.accelerate(small(), enabled=False))


def test_twins_compute_model_py_maths():
    """Accelerated and plain logits agree to bf16 rounding (the kernels round like one-token steps, torch
    does not, so the bits may differ): the twins compute the same network."""
    plain = small()
    fast = copy.deepcopy(plain)
    if not accel.accelerate(fast).kernels:
        pytest.skip("CPU kernels unavailable")
    ids = torch.randint(0, 300, (1, 9))
    a, b = cached_logits(plain, ids).float(), cached_logits(fast, ids).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_an_edited_model_py_function_runs_and_is_reported(monkeypatch):
    """Patching a mirrored function (as editing model.py does) switches its twins off: the edited code
    runs, the logits change, and the report names the function and the twins left off."""
    model = small()
    ids = torch.randint(0, 300, (1, 7))
    if not accel.accelerate(model).kernels:
        pytest.skip("CPU kernels unavailable")
    before = cached_logits(model, ids)

    original = M.RMSNorm.forward

    def forward(self, x):  # an ablation: twice the normalised scale
        return 2 * original(self, x)

    monkeypatch.setattr(M.RMSNorm, "forward", forward)
    report = accel.accelerate(model)
    assert report.edited == ["RMSNorm.forward"]
    assert report.off == ["Block", "RMSNorm"] and "RMSNorm.forward" in str(report)
    assert type(model.layers[0]) is M.TransformerBlock and type(model.norm) is M.RMSNorm
    assert type(model.layers[0].attention) is accel.FastAttention  # untouched by the edit
    assert not torch.equal(cached_logits(model, ids), before)
    monkeypatch.undo()
    assert accel.accelerate(model).edited == []
    assert torch.equal(cached_logits(model, ids), before)


@pytest.mark.slow
def test_an_edit_to_model_py_changes_what_generate_prints(monkeypatch, capsys):
    """The path generate.py runs (the embedded SmolLM2, bf16, CPU kernels on): editing
    Attention.forward changes the text, and the first line printed names the edit."""
    argv = ["--prompt", "The capital of France is", "--max-new-tokens", "6"]
    generate.main(argv)
    plain = capsys.readouterr()

    def forward(self, x, freqs, input_pos, mask):  # an ablation: attention output switched off
        return self.wo(torch.zeros_like(x[..., : self.n_head * self.head_dim]))

    monkeypatch.setattr(M.Attention, "forward", forward)
    generate.main(argv)
    edited = capsys.readouterr()
    assert edited.out != plain.out
    if "CPU kernels: on" in plain.err:
        assert "Attention.forward" in edited.err and "run as written" in edited.err
    generate.main(argv + ["--no-kernels"])  # and with the kernels off altogether
    assert "runs as written" in capsys.readouterr().err


@pytest.mark.slow
def test_show_colours_by_level_and_never_prints_stop_tokens(monkeypatch, capsys):
    argv = ["--chat", "--prompt", "Say hi.", "--max-new-tokens", "48", "--draft", "ngram", "--k", "3"]
    generate.main(argv)
    out = capsys.readouterr().out
    assert "<|im_end|>" not in out
    generate.main(argv + ["--show"])
    shown = capsys.readouterr().out
    assert "<|im_end|>" not in shown and "\033[" not in shown  # captured: not a terminal
    assert "level 0 target" in shown and "level 1 ngram" in shown
    assert shown.split("\ntokens by who produced them")[0].strip() == out.strip()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    generate.main(argv + ["--show"])
    assert "\033[1;31m" in capsys.readouterr().out


def test_decoding_takes_atens_threads_only_where_the_kernels_run_every_linear():
    """cpu_kernels.serial_aten around the decoding loops: ATen drops to one thread only for models whose
    every linear runs on the kernels (bf16, MXFP4), never for an fp32 or a plain model, whose linears
    are ATen's own; and the thread count is back after the loop."""
    import mxfp4
    from kernels import cpu as cpu_kernels
    from speculate import ModelLevel, autoregressive_decode

    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")
    bf16, fp32, plain = small(), small(torch.float32), small()
    cast = mxfp4.quantize_model(small())
    for m in (bf16, fp32, cast):
        accel.accelerate(m)
    assert cpu_kernels.decodes_on_kernels(bf16) and cpu_kernels.decodes_on_kernels(cast)
    assert not cpu_kernels.decodes_on_kernels(fp32) and not cpu_kernels.decodes_on_kernels(plain)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m, inside in ((bf16, 1), (fp32, 2), (plain, 2)):
            seen = []
            autoregressive_decode(
                ModelLevel(m),
                torch.tensor([1, 2, 3]),
                3,
                on_token=lambda _, seen=seen: seen.append(torch.get_num_threads()),
            )
            assert seen == [inside] * 3 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
