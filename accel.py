"""Speed, applied from outside: `accelerate(model)` and `compile_decode(model)`.

model.py, mxfp4.py and int4.py are plain PyTorch: what they say is what runs. This module is the one
visible step that makes them fast, and the one place that knows both the modules and the kernels:

    model, tokenizer = load_model()         # plain modules, exactly as model.py builds them
    report = accelerate(model)               # swap in kernel-backed twins, in place
    print(report)                            # "CPU kernels: on (...)"

A twin is a subclass of the plain module with the same state and the same maths, computed by a kernel
(kernels/cpu in C++ on AVX-512 CPUs, kernels/*_triton.py on CUDA). Swapping is a class change, so no
tensor is copied and tied weights stay tied; `accelerate(model, enabled=False)` swaps them back. Where
a kernel cannot take an input (another device or dtype, a gradient, hooks), the twin calls the plain
module's own forward.

The twins of model.py's modules re-implement its code in C++, so they can only honour model.py as it
was written when they were checked against it. Each twin names the functions it mirrors, and
`accelerate` compares their source (comments and docstrings aside) with the fingerprints below: a
function edited in model.py (or patched at run time) switches off every twin that mirrors it, and the
report says so. The student's edit then runs, slower, instead of being silently ignored. A test keeps
the fingerprints current, together with the tests that the twins give model.py's bits.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from dataclasses import dataclass, field
from operator import is_

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import int4
import model as M
import mxfp4
import tiny
from kernels import cpu as cpu_kernels

try:  # the Triton kernels need triton; without it CUDA takes the plain path
    from kernels.int4_triton import int4_linear as int4_triton
    from kernels.mxfp4_triton import KERNEL_DTYPES
    from kernels.mxfp4_triton import mxfp4_linear as mxfp4_triton
except ImportError:
    mxfp4_triton = int4_triton = None
    KERNEL_DTYPES = ()


# Forwards over more rows than this are prefills: no verification or catch-up of a level that decodes
# every round gets there (speculate.COMPILE_MAX_TOKENS is the same bound). They are compute-bound, and
# there torch's GEMM beats our M-invariant kernels: widening a bf16 weight to fp32 for torch's fp32 GEMM
# was 1.7x faster at 80 rows, 2.1x at 240, on a 2-core Ice Lake (no AVX512-BF16: torch's own bf16 GEMM
# was slower than ours there), and on a 2-core Zen 5, which multiplies bf16 natively, torch's bf16 GEMM
# prefilled 76 tokens of SmolLM2 in 65 ms where the fp32 one took 191 and ours 206 (long_linear picks).
# Its rows do not round like one-token steps, which is why plain and speculative decoding both prefill
# the prompt without its last token and compute that token's row in a short forward: the cache then
# holds the same bits in both (tests/test_cpu_kernels.py).
LONG_FORWARD = 64


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _bf16_gemm(x: Tensor) -> bool:
    """Whether a long forward of x runs torch's GEMM in bf16 (long_linear)."""
    return x.dtype == torch.bfloat16 and cpu_kernels.native_bf16()


def long_linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T for a long forward by torch's GEMM: in bf16 where both are bf16 and the CPU multiplies
    bf16 natively (cpu_kernels.native_bf16), else both widened to fp32 (exactly; a 4-bit weight decoded
    by the kernels first) and the result rounded back to x's dtype. Either way the maths of our kernels
    (fp32 sums of exact products, one rounding to x's dtype), summed in another order."""
    with cpu_kernels.all_threads():  # during decoding ATen has one thread (cpu_kernels.serial_aten)
        if w.dtype == torch.bfloat16 and _bf16_gemm(x):
            return F.linear(x, w)
        return F.linear(x.float(), w.float()).to(x.dtype)


def _no_grad_wanted(x: Tensor, *params: Tensor) -> bool:
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params))


# --- the twins ---------------------------------------------------------------------------------------


class FastLinear(nn.Linear):
    """nn.Linear with a bf16 weight on the CPU through kernels/cpu's bf16_linear: torch's bf16 GEMV
    reads at about half the fp32 bandwidth there, and ours rounds every row alike whatever the number
    of rows (a verification forward gives the bits of one-token steps). Long forwards (prefills, past
    LONG_FORWARD rows) take long_linear instead."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.dtype == torch.bfloat16 and cpu_kernels.usable(x) and _no_grad_wanted(x, w):
            y = cpu_kernels.bf16_linear(x, w) if _rows(x) <= LONG_FORWARD else long_linear(x, w)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return super().forward(x)

    def cpu_spec(self):
        """How the fused block calls this layer (kind 0: a bf16 weight), or None."""
        return (0, self.weight, self.weight) if self.weight.dtype == torch.bfloat16 else None


class _Int8Activations:
    """What the MXFP4 and int4 twins share for int8_activations (set by accelerate): on a CPU with
    AVX512-VNNI, round x to int8 per block of 32 and use integer dot products (kernels/cpu
    mxfp4_linear_i8, int4_linear_i8): faster, but not the plain module's bits, so a level's numerics.
    Those kernels read the weight packed in stripes of 16 rows (cpu_kernels.pack_i8): a second copy of
    the 4-bit weight, made when accelerate turns the option on and dropped when it turns it off (a
    weight changed in place afterwards needs accelerate again). Ignored on CUDA, on CPUs without VNNI
    and for layers whose outputs are not a multiple of 16 (the exact kernel runs). Long forwards (past
    LONG_FORWARD rows) take long_linear either way: a prefill is the same with and without the option."""

    int8_activations: bool = False

    def _set_int8(self, on: bool) -> None:
        self.int8_activations = on
        if on and cpu_kernels.vnni_available() and self.out_features % 16 == 0:
            self.__dict__["_i8_weight"] = cpu_kernels.pack_i8(self.codes, self.scales)
        else:
            self.__dict__.pop("_i8_weight", None)

    def _int8(self) -> tuple | None:
        """The packed weight where the int8 kernels run, else None."""
        if not (self.int8_activations and cpu_kernels.vnni_available()):
            return None
        return self.__dict__.get("_i8_weight")


class FastMXFP4Linear(_Int8Activations, mxfp4.MXFP4Linear):
    """MXFP4Linear reading its packed weight directly: Triton on CUDA, C++ on the CPU (the exact kernel,
    or the int8 one: _Int8Activations). Long forwards (past LONG_FORWARD rows) decode the weight for
    torch's GEMM (long_linear): to bf16 where that GEMM runs in bf16 (exact), else to fp32."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and mxfp4_triton is not None and x.dtype in KERNEL_DTYPES:
            y = mxfp4_triton(x.reshape(-1, self.in_features), self.codes, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        elif cpu_kernels.usable(x) and _rows(x) > LONG_FORWARD:
            decode = cpu_kernels.mxfp4_weight_bf16 if _bf16_gemm(x) else cpu_kernels.mxfp4_weight_f32
            y = long_linear(x, decode(self.codes, self.scales))
        elif cpu_kernels.usable(x):
            packed = self._int8()
            if packed is not None:
                y = cpu_kernels.mxfp4_linear_i8(x, *packed)
            else:
                y = cpu_kernels.mxfp4_linear(x, self.codes, self.scales)
        else:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def cpu_spec(self):
        packed = self._int8()
        return (1, self.codes, self.scales) if packed is None else (3, *packed)


class FastInt4Linear(_Int8Activations, int4.Int4Linear):
    """Int4Linear reading its packed weight directly: Triton on CUDA, C++ on the CPU (the exact kernel,
    or the int8 one: _Int8Activations)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and int4_triton is not None and x.dtype in KERNEL_DTYPES:
            y = int4_triton(x.reshape(-1, self.in_features), self.codes, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        elif cpu_kernels.usable(x) and _rows(x) > LONG_FORWARD:
            y = long_linear(x, cpu_kernels.int4_weight_f32(self.codes, self.scales))
        elif cpu_kernels.usable(x):
            packed = self._int8()
            if packed is not None:
                y = cpu_kernels.int4_linear_i8(x, *packed)
            else:
                y = cpu_kernels.int4_linear(x, self.codes, self.scales)
        else:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def cpu_spec(self):
        packed = self._int8()
        return (2, self.codes, self.scales) if packed is None else (4, *packed)


class FastSubsetHead(tiny.SubsetHead):
    """tiny's frequent-token head with its bf16 rows through bf16_linear, as FastLinear."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == torch.bfloat16 and cpu_kernels.usable(x):
            return self.scatter(cpu_kernels.bf16_linear(x, self.weight))
        return super().forward(x)

    def cpu_spec(self):
        return (0, self.weight, self.weight) if self.weight.dtype == torch.bfloat16 else None


class FastRMSNorm(M.RMSNorm):
    """model.RMSNorm.forward in one C++ call (the same operations in the same order)."""

    def forward(self, x: Tensor) -> Tensor:
        # (a prefill's rows are many: torch's vectorized ops beat our sequential double sums there)
        if cpu_kernels.usable(x) and cpu_kernels.usable(self.weight) and _rows(x) <= LONG_FORWARD:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastAttention(M.Attention):
    """model.Attention.forward with RoPE and the attention over the cache in C++. The kernel computes
    each query row alone, so a forward over k+1 tokens gives exactly the rows of k+1 one-token steps
    (SDPA's blocking depends on the token count): what makes greedy speculation bit-identical to
    plain decoding. Prefills (past LONG_FORWARD tokens) take SDPA, which is faster there."""

    def forward(self, x, freqs, input_pos, mask):
        if input_pos is None or freqs.dim() != 3 or not cpu_kernels.usable(x):
            return super().forward(x, freqs, input_pos, mask)
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        rope = cpu_kernels.rope if T <= LONG_FORWARD else M.apply_rope  # the same maths, vectorized
        q, k = rope(q, freqs), rope(k, freqs)
        k, v = self.kv_cache.update(input_pos, k, v)
        if T > LONG_FORWARD and mask.dim() == 2:
            # A prefill: torch's SDPA (flash attention on the CPU) over the slots any row can see,
            # ~3x faster than our row-at-a-time kernel at 240 tokens. Like long_linear, not the bits of
            # one-token steps, which only a prefill may be.
            seen = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            y = M.cached_attention(q, k[:, :, :seen], v[:, :, :seen], mask[:, :seen])
        elif cpu_kernels.attention_usable(q, k, mask):
            y = cpu_kernels.attention(q, k, v, mask)
        else:
            y = M.cached_attention(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FastBlock(M.TransformerBlock):
    """model.TransformerBlock on the cached path in one C++ call (kernels/cpu/block.cpp): the same
    kernels and operations in the same order as the twins above, so the same bits, without ~150 us of
    Python per block (a third of a 135M model's decode step). FastTransformer calls all the blocks at
    once where it can; this is the call for the blocks one by one. It steps aside (the modules run one
    by one) for hooks (tensor parallelism adds its all-reduces as hooks), compilation, another device,
    fp32 weights, a linear it has no kernel for, or a prefill (LONG_FORWARD: its bf16 linears then
    take torch's fp32 GEMM)."""

    def forward(self, x, freqs, input_pos, mask):
        if input_pos is not None:
            out = self._fused(x, freqs, input_pos, mask)
            if out is not None:
                return out
        return super().forward(x, freqs, input_pos, mask)

    def _fused(self, x, freqs, input_pos, mask):
        plan = _fused_plan(self, _BlockPlan, x, freqs, mask)
        if plan is None:
            return None
        w, kinds, k_cache, v_cache, n_head, n_kv, head_dim, eps = plan.args
        return cpu_kernels.block(
            x, w, kinds, k_cache, v_cache, input_pos, freqs, mask, n_head, n_kv, head_dim, eps
        )


def _fused_plan(module, make, x, freqs, mask, rows=None):
    """The plan of `module`'s fused call (kept in its __dict__, made again by make(module) when what it
    was read from changed), or None where the call must step aside for this input: compilation, an
    input the kernels do not take, a long forward, a mask attention cannot use, or a hook. rows: the
    tokens of the forward, where x is not its input (FastTransformer.float_logits)."""
    if (
        torch.compiler.is_compiling()
        or not cpu_kernels.usable(x)
        or freqs.dim() != 3
        or (_rows(x) if rows is None else rows) > LONG_FORWARD
    ):
        return None
    plan = module.__dict__.get("_fused_plan")
    if plan is None or not plan.holds():
        plan = module.__dict__["_fused_plan"] = make(module)
    if (
        plan.args is None
        or not cpu_kernels.attention_takes(plan.head_dim, plan.cache_dtype, mask)
        or plan.hooked()
    ):
        return None
    return plan


class FastTransformer(M.Transformer):
    """model.Transformer whose cached path, after the embedding, is one C++ call (kernels/cpu/block.cpp's
    Stack: each FastBlock's fused call in turn, then the final norm and the output head where they have
    kernels), its weights bound once. Python's ~40 us around each block call (the module call,
    FastBlock's checks, converting its arguments) cost 1.2-1.6 ms of a SmolLM2 step, a third of an MXFP4
    draft step's time outside the weights; passing every layer's weights on each call and the norm and
    head module calls, another 0.3-0.5 ms. Where any block would step aside (FastBlock says when), all of
    them run as modules, one by one. The rest is Transformer.forward as written."""

    def forward(self, idx, input_pos=None, mask=None, positions=None, last=None):
        x = self.tok_embeddings(idx)
        if input_pos is None:
            freqs = M.rope_table(self.config, idx.shape[1], idx.device)
        else:
            if self.max_seq_length < 0:
                raise RuntimeError("call setup_caches() before a cached forward (input_pos given)")
            freqs = self.freqs_cis[input_pos if positions is None else positions]
            if mask is None:
                mask = self.causal_mask[input_pos]
        plan = None if input_pos is None else self._fused(x, freqs, input_pos, mask)
        if plan is not None and plan.with_head:
            self.features, logits = plan.stack.forward(x, input_pos, freqs, mask, last or 0)
            return logits
        if plan is not None:
            x = plan.stack.blocks(x, input_pos, freqs, mask)
        else:
            for layer in self.layers:
                x = layer(x, freqs, input_pos, mask)
        x = self.norm(x)
        self.features = x
        if last is not None:
            x = x[:, -last:]
        return self.output(x)

    def _fused(self, x, freqs, input_pos, mask):
        """The plan of the one call for this input, or None where the blocks run one by one."""
        return _fused_plan(self, _StackPlan, x, freqs, mask)

    def float_logits(self, idx, input_pos, last=None):
        """forward(idx, input_pos, last=last)[0].float(), the same bits, as one C++ call (Stack.step: the
        embedding, RoPE and mask rows gathered there, the logits widened there), or None where that call
        does not apply; ModelLevel then calls the model. Why: around the fused stack, those few small
        Python operations ran on caches the weights had just flushed, ~0.3 ms of a decode step."""
        emb = self._modules["tok_embeddings"]
        if (
            type(emb) is not nn.Embedding
            or emb.max_norm is not None
            or idx.dim() != 2
            or idx.shape[0] != 1
            or idx.dtype != torch.long
            or not idx.is_contiguous()
            or input_pos.dtype != torch.long
            or input_pos.shape != idx.shape[1:]
            or not input_pos.is_contiguous()
            or not emb.weight.is_contiguous()
            or self.max_seq_length < 0
            or self._forward_hooks
            or self._forward_pre_hooks
            or emb._forward_hooks
            or emb._forward_pre_hooks
        ):
            return None
        plan = _fused_plan(self, _StackPlan, emb.weight, self.freqs_cis, self.causal_mask, rows=idx.shape[1])
        if plan is None or not plan.with_head:
            return None
        self.features, logits = plan.stack.step(
            idx, input_pos, emb.weight, self.freqs_cis, self.causal_mask, last or 0
        )
        return logits


class _Watch:
    """What a plan was read from, checked in a few microseconds per call: (mapping, name) pairs whose
    values must still be the very objects read, mappings watched whole (their size too, for an entry
    added), modules whose class must not have changed, and hook dicts that must stay empty. Each check
    is one C-level pass over flat lists: the Python loop it replaced took ~9 us a block."""

    def __init__(self):
        self.dicts, self.names, self.values = [], [], []
        self.sized, self.sizes = [], []
        self.modules, self.types, self.hooks = [], [], []
        self.epoch = None  # the decoding loop's epoch this plan was last checked in (cpu_kernels.loop_epoch)
        self.was_hooked = False

    def __reduce__(self):
        # A copied or pickled module reads its own plan on its first call (a plan holds a C++ object and
        # what it was read from, which a copy does not share).
        return _no_plan, ()

    def watch(self, d: dict, names: tuple | None = None):
        if names is None:
            names = tuple(d)
            self.sized.append(d)
            self.sizes.append(len(d))
        self.dicts += [d] * len(names)
        self.names += names
        self.values += map(d.get, names)  # kept, so no object read can be freed and its id reused

    def watch_modules(self, *modules):
        self.modules += modules
        self.types += map(type, modules)
        self.hooks += (d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))

    def absorb(self, other: _Watch):
        for name in ("dicts", "names", "values", "sized", "sizes", "modules", "types", "hooks"):
            getattr(self, name).extend(getattr(other, name))

    def holds(self) -> bool:
        """Whether everything read is still there; inside a decoding loop, once per epoch
        (cpu_kernels.decoding_loop says why), hooks included."""
        epoch = cpu_kernels.loop_epoch()
        if epoch is not None and epoch == self.epoch:
            return True
        ok = (
            all(map(is_, map(dict.get, self.dicts, self.names), self.values))
            and list(map(len, self.sized)) == self.sizes
            and list(map(type, self.modules)) == self.types
        )
        self.epoch = epoch if ok else None
        if self.epoch is not None:
            self.was_hooked = self._hooked()
        return ok

    def hooked(self) -> bool:
        """Whether a hook would run (hooks are how tensor parallelism adds its all-reduces): as found by
        the last holds() inside a decoding loop, else looked up now."""
        if self.epoch is not None and self.epoch == cpu_kernels.loop_epoch():
            return self.was_hooked
        return self._hooked()

    def _hooked(self) -> bool:
        return any(map(len, self.hooks)) or bool(_global_hooks[0] or _global_hooks[1])


def _no_plan():
    return None


_global_hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


class _BlockPlan(_Watch):
    """FastBlock's fused call, minus its per-call inputs: the weights and kinds of its linears, its cache
    and shapes, or args = None where it cannot run. Gathering them through nn.Module attributes cost
    ~50 us a block (1.5 ms of a SmolLM2 step), so a block keeps its plan, with what it was read from:
    holds() checks that every submodule, class, parameter, buffer, int8 flag, eps and the cache are
    still the ones read (a layer or weight replaced, a cache reallocated or accelerate() changing a class
    or a flag makes a new plan). Hooks are checked on every call."""

    def __init__(self, block):
        super().__init__()
        mods = block._modules
        attn, ffn = mods["attention"], mods["feed_forward"]
        parts = [attn._modules[n] for n in ("wqkv", "wo")] + [ffn._modules[n] for n in ("w1", "w3", "w2")]
        parts += [mods["attention_norm"], mods["ffn_norm"]]
        self.watch_modules(block, attn, ffn, *parts)
        self.watch(block._modules, ("attention", "feed_forward", "attention_norm", "ffn_norm"))
        self.watch(attn._modules, ("wqkv", "wo", "kv_cache"))
        self.watch(ffn._modules, ("w1", "w3", "w2"))
        self.watch(attn.__dict__, ("n_head", "n_local_heads", "head_dim"))
        for m in parts:
            self.watch(m._parameters)
            self.watch(m._buffers)
            self.watch(m.__dict__, ("int8_activations", "_i8_weight", "eps"))
        self.args = self._args(attn, parts)

    def _args(self, attn, parts):
        cache = attn._modules.get("kv_cache")
        if cache is None:
            return None
        self.watch(cache._buffers, ("k_cache", "v_cache"))
        specs = [_linear_spec(m) for m in parts[:5]]
        norms = parts[5:]
        if (
            None in specs
            or norms[0].eps != norms[1].eps
            or any(not cpu_kernels.usable(n.weight) for n in norms)
        ):
            return None
        self.head_dim, self.cache_dtype = attn.head_dim, cache.k_cache.dtype
        weights = [norms[0].weight, norms[1].weight] + [t for _, a, b in specs for t in (a, b)]
        kinds = [kind for kind, _, _ in specs]
        return (weights, kinds, cache.k_cache, cache.v_cache, attn.n_head, attn.n_local_heads, attn.head_dim,
                norms[0].eps)  # fmt: skip


class _StackPlan(_Watch):
    """FastTransformer's one call (stack: cpu_kernels.stack): its blocks' plans' arguments concatenated
    (each block keeps its own plan too, for its own calls), and one check for all of them; with_head
    where the final norm and the output head run in the same call (a FastRMSNorm and a linear with a
    kernel: cpu_spec). stack is None where a block is not a FastBlock, cannot be fused, or the blocks'
    shapes differ."""

    def __init__(self, model):
        super().__init__()
        mods = model._modules
        layers, norm, output = mods["layers"], mods["norm"], mods["output"]
        self.watch(mods, ("layers", "norm", "output"))
        self.watch(layers._modules)
        blocks = list(layers._modules.values())
        self.watch_modules(*blocks, norm, output)
        for m in (norm, output):
            self.watch(m._parameters)
            self.watch(m._buffers)
            self.watch(m.__dict__, ("int8_activations", "_i8_weight", "eps"))
        plans = [_BlockPlan(b) if type(b) is FastBlock else None for b in blocks]
        for block, plan in zip(blocks, plans):
            if plan is not None:
                block.__dict__["_fused_plan"] = plan
                self.absorb(plan)
        self.args = self.stack = None
        self.with_head = False
        if not plans or any(p is None or p.args is None for p in plans):
            return
        shapes = {p.args[4:] + (p.cache_dtype,) for p in plans}  # heads, kv heads, head_dim, eps, cache dtype
        if len(shapes) != 1:
            return
        self.head_dim, self.cache_dtype = plans[0].head_dim, plans[0].cache_dtype
        self.args = (
            [w for p in plans for w in p.args[0]],
            [k for p in plans for k in p.args[1]],
            [p.args[2] for p in plans],
            [p.args[3] for p in plans],
            *plans[0].args[4:],
        )
        head = _linear_spec(output) if type(output) in (FastLinear, FastMXFP4Linear, FastInt4Linear) else None
        self.with_head = type(norm) is FastRMSNorm and cpu_kernels.usable(norm.weight) and head is not None
        self.stack = cpu_kernels.stack(
            *self.args,
            norm=(norm.weight, norm.eps) if self.with_head else None,
            head=head if self.with_head else None,
        )


def _linear_spec(layer) -> tuple | None:
    if getattr(layer, "bias", None) is not None:
        return None
    spec = getattr(layer, "cpu_spec", None)
    return spec() if spec is not None else None


# plain class -> (twin, the model.py functions the twin re-implements)
_MIRRORS = ("Attention.forward", "apply_rope", "cached_attention", "KVCache.update")
TWINS: dict[type, tuple[type, tuple[str, ...]]] = {
    nn.Linear: (FastLinear, ()),
    mxfp4.MXFP4Linear: (FastMXFP4Linear, ()),
    int4.Int4Linear: (FastInt4Linear, ()),
    tiny.SubsetHead: (FastSubsetHead, ()),
    M.RMSNorm: (FastRMSNorm, ("RMSNorm.forward",)),
    M.Attention: (FastAttention, _MIRRORS),
    M.TransformerBlock: (
        FastBlock,
        ("TransformerBlock.forward", "FeedForward.forward", "RMSNorm.forward", *_MIRRORS),
    ),
    # Its fused loop runs FastBlocks only, which are off when what they mirror is edited.
    M.Transformer: (FastTransformer, ("Transformer.forward",)),
}

# The fingerprints (see source_fingerprint) of model.py's functions as the twins mirror them. After a
# deliberate change to one of them, change its twin and the C++ to match, then update the value here
# (tests/test_accel.py prints the new ones).
FINGERPRINTS = {
    "Transformer.forward": "9c69e7fa1ab40491",
    "Attention.forward": "b6c86a9f37dec0c8",
    "apply_rope": "8c060958f3b08cb3",
    "cached_attention": "33b92cb548796d59",
    "KVCache.update": "6358f3b427407f3f",
    "RMSNorm.forward": "d14edad3d4c6859c",
    "TransformerBlock.forward": "4455023dba70d7b5",
    "FeedForward.forward": "0a20d3670f84c779",
}


def source_fingerprint(fn) -> str | None:
    """A short hash of a function's code, blind to comments, docstrings and formatting; None if its
    source cannot be read (a lambda typed at a prompt, a C function)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def _resolve(name: str):
    obj = M
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def edited_functions() -> list[str]:
    """model.py's functions that no longer match what the twins mirror."""
    return [n for n, fp in FINGERPRINTS.items() if source_fingerprint(_resolve(n)) != fp]


# --- the step ------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What accelerate() did: the twins swapped in (by name, how many), the twins left off because
    model.py changed under them, and whether the CPU kernels can run at all (and why not)."""

    enabled: bool
    kernels: bool
    reason: str | None = None
    swapped: dict = field(default_factory=dict)
    edited: list = field(default_factory=list)
    off: list = field(default_factory=list)

    def __str__(self) -> str:
        if not self.enabled:
            return "CPU kernels: off (model.py runs as written)"
        if not self.kernels:
            state = f"off ({self.reason})" if self.reason else "off"
            return f"CPU kernels: {state}; model.py runs as written"
        line = "CPU kernels: on; --no-kernels runs model.py as written"
        if self.edited:
            line += (
                f"\n  model.py's {', '.join(self.edited)} differ from what the kernels implement: "
                f"{', '.join(self.off)} run as written (slower)"
            )
        return line


def accelerate(model: nn.Module, enabled: bool = True, int8_activations: bool | str = False) -> Report:
    """Swap every module of `model` that has a twin (above) for it, in place; with enabled=False, swap
    twins back to their plain classes. Twins that mirror an edited model.py function are left off.
    Safe to call on a model that is already (partly) accelerated, and on models on any device: twins
    only call kernels for inputs the kernels take.
    int8_activations: the MXFP4 and int4 twins round their input to int8 on CPUs with AVX512-VNNI
    (FastMXFP4Linear says what that changes); every call sets it, on or off, on all of them. "auto":
    on where it measures faster on this CPU (int8_pays), for a level whose numerics are free to choose."""
    kernels = cpu_kernels.available() if enabled else False
    if int8_activations == "auto":
        int8_activations = bool(kernels) and int8_pays(model)
    elif not isinstance(int8_activations, bool):
        raise ValueError(f"int8_activations must be True, False or 'auto', got {int8_activations!r}")
    edited = edited_functions() if enabled else []
    report = Report(enabled, kernels, None if kernels or not enabled else cpu_kernels.unavailable_reason())
    report.edited = edited
    report.off = sorted(
        {twin.__name__.removeprefix("Fast") for twin, names in TWINS.values() if set(names) & set(edited)}
    )
    plain_of = {twin: plain for plain, (twin, _) in TWINS.items()}
    for module in model.modules():
        plain = plain_of.get(type(module), type(module))
        twin, names = TWINS.get(plain, (None, ()))
        if twin is None:
            continue
        want = twin if enabled and not (set(names) & set(edited)) else plain
        module.__dict__.pop("_fused_plan", None)
        if type(module) is not want:
            module.__class__ = want
        if want is twin:
            report.swapped[twin.__name__] = report.swapped.get(twin.__name__, 0) + 1
            if twin in (FastMXFP4Linear, FastInt4Linear):
                module._set_int8(int8_activations)
        else:
            module.__dict__.pop("int8_activations", None)
            module.__dict__.pop("_i8_weight", None)
    cpu_kernels.models_changed()  # classes and flags: no registration hook sees those
    return report


_INT8_PAYS: dict = {}


def int8_pays(model: nn.Module, repeats: int = 5) -> bool:
    """Whether int8 activations make `model`'s 4-bit linears faster on this CPU, measured: every MXFP4
    or int4 linear of the model once on one bf16 row (a decode step's weight reads), with the exact
    kernels and with the int8 ones, passes in turn, best of `repeats` each (tens of milliseconds for
    SmolLM2, plus packing the weights once; remembered per set of shapes and thread count). Whole
    passes, because a single matrix can sit in the cache and mislead: an earlier int8 kernel was faster
    on SmolLM2's head alone on a 2-core Zen 5 and 1.3x slower over the whole model there. False without
    VNNI or 4-bit linears on the CPU."""
    if not cpu_kernels.vnni_available():
        return False
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (mxfp4.MXFP4Linear, int4.Int4Linear)) and m.codes.device.type == "cpu"
    ]
    if not layers:
        return False
    calls = [(m.codes, m.scales, m.in_features, isinstance(m, mxfp4.MXFP4Linear)) for m in layers]
    key = (tuple((mx, *c.shape, *sc.shape) for c, sc, _, mx in calls), torch.get_num_threads())
    if key not in _INT8_PAYS:
        g = torch.Generator().manual_seed(0)  # not torch's global generator: sampling may rely on it
        xs = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for _, _, k, _ in calls}
        exact = {True: cpu_kernels.mxfp4_linear, False: cpu_kernels.int4_linear}
        with_i8 = {True: cpu_kernels.mxfp4_linear_i8, False: cpu_kernels.int4_linear_i8}
        # Each layer as it would run: the int8 kernels on the packed weight where the layer takes them.
        runs = {
            False: [(exact[mx], xs[k], codes, scales) for codes, scales, k, mx in calls],
            True: [
                (with_i8[mx], xs[k], *cpu_kernels.pack_i8(codes, scales))
                if codes.shape[0] % 16 == 0
                else (exact[mx], xs[k], codes, scales)
                for codes, scales, k, mx in calls
            ],
        }

        def run(int8):
            for f, x, codes, scales in runs[int8]:
                f(x, codes, scales)

        with torch.no_grad():
            best = cpu_kernels.best_times({int8: lambda int8=int8: run(int8) for int8 in runs}, repeats)
        _INT8_PAYS[key] = best[True] < best[False]
    return _INT8_PAYS[key]


# --- torch.compile and CUDA graphs ---------------------------------------------------------------------

# Every level shares Transformer.forward's code object, so each (model, T) pair is one of dynamo's cache
# entries for it: the default limit of 8 was exhausted within two prompts of a two-level run (steps,
# verifications of each length, trees), and under fullgraph=True the next shape is a hard error. Levels
# x distinct T stay far below 256 entries; every cache growth compiles them all again (new buffer
# shapes), which growing caches by doubling (speculate.ModelLevel.reset) keeps to a few per run.
RECOMPILE_LIMIT = 256


def compile_decode(model: nn.Module):
    """`model` compiled for decode-sized forwards, as gpt-fast does: one CUDA graph per token count
    (reduce-overhead), the whole forward in one graph (fullgraph), static shapes."""
    config = torch._dynamo.config
    # recompile_limit was cache_size_limit before torch 2.7; accumulated_recompile_limit likewise.
    for names, value in (
        (("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8 * RECOMPILE_LIMIT),
    ):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), value))
    return torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
