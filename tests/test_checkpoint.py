"""GGUF and converted-checkpoint loading on small files written by the test itself."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from checkpoint import CheckpointError, load_model, read_checkpoint, read_gguf
from model import ModelArgs, Transformer

ARGS = dict(block_size=64, vocab_size=64, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128)


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleaved RoPE layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, args: ModelArgs, sd: dict, qtypes: dict, arch="llama"):
    """Write model.py-named weights as a llama.cpp GGUF; qtypes maps a GGUF tensor name to its type."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layer)
    w.add_context_length(args.block_size)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_head)
    w.add_head_count_kv(args.n_local_heads)
    w.add_rope_freq_base(args.rope_base)
    w.add_layer_norm_rms_eps(args.norm_eps)
    q_size, kv_size = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
    tensors = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    if not args.tie_embeddings:
        tensors["output.weight"] = sd["output.weight"]
    for i in range(args.n_layer):
        p = f"layers.{i}."
        q, k, v = sd[p + "attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        tensors |= {
            f"blk.{i}.attn_q.weight": llamacpp_permute(q.numpy(), args.n_head),
            f"blk.{i}.attn_k.weight": llamacpp_permute(k.numpy(), args.n_local_heads),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": sd[p + "attention.wo.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "feed_forward.w1.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "feed_forward.w3.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "feed_forward.w2.weight"],
            f"blk.{i}.attn_norm.weight": sd[p + "attention_norm.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "ffn_norm.weight"],
        }
    for name, t in tensors.items():
        t = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        qt = qtypes.get(name, Q.F32)
        if qt == Q.F32:
            w.add_tensor(name, t)
        elif qt == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, quantize(t, qt), raw_shape=quantize(t, qt).shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_model(tie=False):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(**ARGS, tie_embeddings=tie))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def test_gguf_f32_round_trip_undoes_the_qk_permutation(tmp_path):
    m = random_model()
    write_gguf(tmp_path / "m.gguf", m.config, m.state_dict(), {})
    loaded, tok = load_model(tmp_path / "m.gguf")
    assert tok is None  # no vocabulary in this file
    assert loaded.config.n_local_heads == 2 and not loaded.config.tie_embeddings
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0, msg=k)
    ids = torch.randint(0, 64, (1, 12))
    m.requires_grad_(False)  # both on the same path (the CPU kernels skip weights that want gradients)
    torch.testing.assert_close(loaded(ids), m(ids), atol=0, rtol=0)


@pytest.mark.parametrize("qt", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_gguf_quantized_tensors_dequantize_to_the_run_dtype(tmp_path, qt):
    m = random_model(tie=True)
    sd = m.state_dict()
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_k.weight"]
    write_gguf(tmp_path / "m.gguf", m.config, sd, {n: qt for n in names})
    loaded, _ = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.output.weight is loaded.tok_embeddings.weight  # no output.weight: tied
    # What llama.cpp itself would compute from these bytes, in our layout:
    emb = sd["tok_embeddings.weight"].numpy()
    ref = dequantize(quantize(emb, qt), qt) if qt not in (Q.F16,) else emb.astype(np.float16)
    torch.testing.assert_close(
        loaded.tok_embeddings.weight.float(), torch.tensor(np.asarray(ref, np.float32)).bfloat16().float()
    )
    # A quantized, permuted q: the loader must undo the permutation after dequantizing, so the
    # error against the original rows stays within the format's step (a wrong row order is O(1)).
    q = sd["layers.0.attention.wqkv.weight"][:64]
    _, sd2, _ = read_gguf(tmp_path / "m.gguf")
    err = (sd2["layers.0.attention.wqkv.weight"][:64] - q).abs().max()
    assert err < (0.02 if qt in (Q.F16, Q.BF16, Q.Q8_0) else 0.2), err


def test_unsupported_gguf_arch_and_tensor_type(tmp_path):
    m = random_model()
    write_gguf(tmp_path / "gpt2.gguf", m.config, m.state_dict(), {}, arch="gpt2")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        read_checkpoint(tmp_path / "gpt2.gguf")
    w = GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_block_count(1)
    # IQ4_NL: 18 bytes per block of 32 weights; any bytes will do, we must refuse before decoding.
    w.add_tensor("token_embd.weight", np.zeros((64, 2 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="IQ4_NL, which is not supported"):
        read_checkpoint(tmp_path / "iq.gguf")


def test_converted_checkpoint_round_trip(tmp_path):
    from test_model import hf_llama

    hf = hf_llama(tmp_path)
    from scripts.convert_hf_checkpoint import main as convert

    out = convert([str(tmp_path)])
    model, _ = load_model(out)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="convert_hf_checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.pth")
        read_checkpoint(tmp_path / "other.pth")
