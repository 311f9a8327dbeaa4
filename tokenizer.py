"""Text <-> token ids for the checkpoints specqd runs: one `Tokenizer` interface over two backends.

- Byte-level BPE (GPT-2 style: SmolLM2, Llama-3, Qwen2) runs on tiktoken, whichever file it comes from: a
  GGUF's metadata, a HF `tokenizer.json`, or Llama-3's tiktoken `tokenizer.model`.
- Sentencepiece (Llama-2's `tokenizer.model`) runs on the `sentencepiece` package.

    tok = load_tokenizer("path/to/model.gguf")   # or a folder, tokenizer.json or tokenizer.model
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), bos=tok.add_bos)
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from pathlib import Path

__all__ = ["Tokenizer", "BPETokenizer", "SentencePieceTokenizer", "tokenizer_from_gguf", "load_tokenizer"]

# Pre-tokenizer regexes: text is cut into pieces first, and BPE never merges across pieces, so each model
# must use exactly the split its merges were learned with.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# SmolLM2 (StarCoder's tokenizer) first cuts every digit out on its own (HF `Digits(individual_digits=True)`),
# then applies GPT-2's regex to each run between digits. As one regex: digits match alone; ` ?\p{N}+` is gone
# because no run holds a digit; and a run of spaces before a digit ends the run, so `(?!\S)` must also accept
# a digit next ("a  1" -> "a", "  ", "1", where GPT-2's regex alone gives "a", " ", " 1").
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# GGUF `tokenizer.ggml.pre` -> split regex (names as llama.cpp's convert_hf_to_gguf.py writes them).
GGUF_PRE_SPLITS = {
    "gpt2": GPT2_SPLIT,
    "smollm": SMOLLM_SPLIT,
    "starcoder": SMOLLM_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}

# Tokens that end a turn or a document in the model families we know. Generation stops on any of them that
# the vocabulary marks special (llama.cpp's end-of-generation set works the same way).
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")

# Meta's Llama-3(.1) tiktoken file holds only the ranks; its 256 special tokens follow them, in this order.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]  # fmt: skip

# Chat templates for files that carry none, chosen by the family the special tokens give away.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Llama-2 chat: the system prompt goes inside the first [INST]; every user turn opens with BOS.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = none %}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Llama-2 chat needs alternating user/assistant messages') }}{% endif %}"
        "{% set content = message['content'] | trim %}"
        "{% if loop.first and system is not none %}"
        "{% set content = '<<SYS>>\n' + system | trim + '\n<</SYS>>\n\n' + content %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
        "{% else %}{{ ' ' + content + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


class Tokenizer:
    """What generation needs from a tokenizer. Subclasses implement `_encode` and `decode`.

    vocab_size: number of ids it can emit. bos_id: None when the model has none. eos_id: the id that ends
    generation (for chat models the end-of-turn token). stop_ids: every id that should stop generation.
    add_bos: whether the model expects BOS in front of a prompt (pass it to `encode(text, bos=...)`).
    specials: special token text -> id; these are recognised as such when they appear in encoded text.
    """

    def __init__(self, *, vocab_size, bos_id, eos_id, stop_ids=(), add_bos=False, specials=None,
                 chat_template=None, family=None):  # fmt: skip
        self.vocab_size = int(vocab_size)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = int(eos_id)
        self.stop_ids = {self.eos_id, *(int(i) for i in stop_ids)}
        self.add_bos = bool(add_bos)
        self.specials = dict(specials or {})
        self.chat_template = chat_template
        self.family = family

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids. `bos=True` puts BOS in front
        unless the text already starts with it (chat templates often write it themselves)."""
        ids = self._encode(text)
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.decode([token_id])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model was tuned on (encode it with `bos=self.add_bos`)."""
        template = self.chat_template or CHAT_TEMPLATES.get(self.family)
        if template is None:
            raise ValueError(f"this tokenizer ({self.family or 'unknown family'}) has no chat template")
        return _render_chat(
            template, messages, add_generation_prompt,
            bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id),
        )  # fmt: skip

    def __repr__(self):
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )


class BPETokenizer(Tokenizer):
    """Byte-level BPE on tiktoken. tiktoken returns ranks, not ids, so `rank_to_id` maps them back."""

    def __init__(self, encoding, rank_to_id: list[int], id_to_bytes: dict[int, bytes], normalize=None, **kw):
        super().__init__(**kw)
        self._enc = encoding
        self._rank_to_id = rank_to_id
        self._id_to_bytes = id_to_bytes
        self._normalize = normalize

    def _encode(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        r2i = self._rank_to_id
        ids = [r2i[r] for r in self._enc.encode(text, allowed_special="all")]
        return [i for i in ids if i >= 0] if -1 in ids else ids

    def decode_bytes(self, ids) -> bytes:
        table = self._id_to_bytes
        try:
            return b"".join(table[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})"
            ) from None

    def decode(self, ids) -> str:
        # A token can hold part of a UTF-8 character; only the joined bytes decode, partial ones as U+FFFD.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """Llama-2's sentencepiece model. sentencepiece reads "<s>" in text as plain characters, so the text is
    cut at special tokens first and each piece between them is encoded on its own."""

    def __init__(self, processor, **kw):
        super().__init__(**kw)
        self._sp = processor
        by_length = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None

    def _encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # the captured separators are the special tokens
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        # sentencepiece writes control tokens (BOS/EOS) as nothing and broken byte sequences as U+FFFD.
        return self._sp.decode([int(i) for i in ids])

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._sp.id_to_piece(int(token_id))


# ---------------------------------------------------------------------------------------------- building


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte-level vocabularies spell each byte as a printable character (space is 'Ġ')."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        # Not in the byte alphabet: the file wrote the text itself (transformers reads it so too).
        return token.encode("utf-8")


def byte_level_bpe(
    tokens: dict[int, str], merges: list[tuple[str, str]], specials: dict[str, int], split: str,
    ignore_merges: bool = False, normalize=None, name: str = "bpe", **kw,
) -> BPETokenizer:  # fmt: skip
    """A BPETokenizer from a byte-level vocabulary (id -> token in GPT-2's byte alphabet) and its merges.

    HF's BPE merges the adjacent pair that comes first in `merges`; tiktoken merges the adjacent pair whose
    concatenation has the lowest rank. So a merged token's rank is the position of the merge that makes it.
    Tokens no merge makes are left out of the table (HF never emits them), unless `ignore_merges`: then, as
    in tiktoken, a piece that is a whole token is taken as is, and every token must be in the table.
    """
    import tiktoken

    id_to_bytes = {i: _token_bytes(t) for i, t in tokens.items() if i not in specials.values()}
    bytes_to_id = {}
    for i in sorted(id_to_bytes):  # a string listed twice keeps its first id
        bytes_to_id.setdefault(id_to_bytes[i], i)
    if sum(bytes([b]) in bytes_to_id for b in range(256)) < 200:
        raise ValueError(f"{name}: not a byte-level vocabulary (most of the 256 byte tokens are missing)")

    # Single bytes are never merged into, so their ranks don't matter; merges follow, in priority order.
    ranked = [bytes([b]) for b in range(256)]
    seen = set(ranked)
    for a, b in merges:
        merged = _token_bytes(a) + _token_bytes(b)
        if merged not in seen:
            if merged not in bytes_to_id:
                raise ValueError(f"{name}: merge {a!r} + {b!r} makes a token that is not in the vocabulary")
            seen.add(merged)
            ranked.append(merged)
    if ignore_merges:
        ranked += [t for t in bytes_to_id if t not in seen]

    # Some vocabularies lack a few bytes (SmolLM2: 0x04, 0xC0, 0xFF...). HF drops such bytes from the output;
    # tiktoken needs every byte in its table, so they get the id -1, which `_encode` then drops.
    rank_to_id = [bytes_to_id.get(t, -1) for t in ranked]
    special_ranks = {text: len(rank_to_id) + k for k, text in enumerate(specials)}
    rank_to_id += list(specials.values())
    id_to_bytes.update({i: text.encode("utf-8") for text, i in specials.items()})
    encoding = tiktoken.Encoding(
        name,
        pat_str=split,
        mergeable_ranks={t: r for r, t in enumerate(ranked)},
        special_tokens=special_ranks,
    )
    return BPETokenizer(
        encoding, rank_to_id, id_to_bytes, normalize=normalize, vocab_size=max(id_to_bytes) + 1,
        specials=specials, **kw,
    )  # fmt: skip


def _end_ids(specials: dict[str, int]) -> set[int]:
    return {specials[t] for t in END_TOKENS if t in specials}


def _family(specials: dict[str, int]) -> str | None:
    if "<|start_header_id|>" in specials:
        return "llama3"
    if "<|im_start|>" in specials:
        return "chatml"
    return None


def tokenizer_from_gguf(reader) -> Tokenizer:
    """The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (a `gguf.GGUFReader`)."""
    fields = reader.fields
    path = getattr(reader, "data", None)
    name = str(getattr(path, "filename", None) or "GGUF file")

    def field(key, default=None):
        return fields[key].contents() if key in fields else default

    model = field("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{name}: no tokenizer in the GGUF metadata")
    if model == "llama":
        raise NotImplementedError(
            f"{name}: sentencepiece tokenizers are not read from GGUF metadata; "
            "pass the model folder with its tokenizer.model instead"
        )
    if model != "gpt2":
        raise ValueError(f"{name}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2')")
    pre = field("tokenizer.ggml.pre", "gpt2")  # files older than the key are GPT-2 style
    if pre not in GGUF_PRE_SPLITS:
        raise ValueError(
            f"{name}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); known: {sorted(GGUF_PRE_SPLITS)}"
        )

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    # CONTROL (3) and USER_DEFINED (4) tokens are stored as plain text and are matched whole in text.
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    eot_id = field("tokenizer.ggml.eot_token_id")  # a chat model's end of turn, where the file names it
    eom_id = field("tokenizer.ggml.eom_token_id")
    end = _end_ids(specials) | {i for i in (eos_id, eot_id, eom_id) if i is not None}
    if eot_id is None and eos_id is None:
        raise ValueError(f"{name}: the GGUF metadata names no end-of-sequence token")
    return byte_level_bpe(
        dict(enumerate(tokens)), merges, specials, GGUF_PRE_SPLITS[pre], name=name,
        bos_id=bos_id, eos_id=eot_id if eot_id is not None else eos_id, stop_ids=end,
        add_bos=field("tokenizer.ggml.add_bos_token", False),
        chat_template=field("tokenizer.chat_template"), family=_family(specials),
    )  # fmt: skip


def _hf_split(pre: dict | None, name: str) -> str:
    """The tiktoken regex equal to a tokenizer.json byte-level pre-tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if steps and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
        raise ValueError(f"{name}: ByteLevel(add_prefix_space=True) pre-tokenizer is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_SPLIT
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return SMOLLM_SPLIT
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if (
            split.get("behavior") == "Isolated"
            and not split.get("invert")
            and "Regex" in split.get("pattern", {})
        ):
            return split["pattern"]["Regex"]
    raise ValueError(f"{name}: unsupported pre-tokenizer {json.dumps(pre)[:300]}")


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _load_hf_json(path: Path) -> Tokenizer:
    """A HF tokenizer.json (byte-level BPE), plus tokenizer_config.json, chat_template.jinja and
    generation_config.json from the same folder where they exist."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: unsupported tokenizer model type {model.get('type')!r} (supported: BPE)")
    decoder = (tj.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"{path}: not a byte-level BPE (decoder {decoder!r})")
    split = _hf_split(tj.get("pre_tokenizer"), str(path))
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: unsupported normalizer {normalizer!r}")

    config = _read_json(path.parent / "tokenizer_config.json")
    generation = _read_json(path.parent / "generation_config.json")
    # Every added token, special or not, is matched whole in text by HF; so it is here.
    specials = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    tokens = {i: t for t, i in model["vocab"].items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]

    def special_id(key):
        text = _token_content(config.get(key))
        if text is None:
            return None
        if text not in specials:
            raise ValueError(
                f"{path.parent / 'tokenizer_config.json'}: {key} {text!r} is not a special token"
            )
        return specials[text]

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    gen_eos = generation.get("eos_token_id", [])
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    end = _end_ids(specials) | set(gen_eos)
    if eos_id is None:
        known = [specials[t] for t in END_TOKENS if t in specials]
        if not gen_eos and not known:
            raise ValueError(
                f"{path}: cannot tell the end-of-sequence token (no tokenizer_config.json eos_token)"
            )
        eos_id = gen_eos[0] if gen_eos else known[0]
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # else the post-processor says: Llama-3 puts BOS in its TemplateProcessing
        post = tj.get("post_processor") or {}
        steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
        bos_text = _token_content(config.get("bos_token"))
        add_bos = any(
            step.get("type") == "TemplateProcessing"
            and any(part.get("SpecialToken", {}).get("id") == bos_text for part in step.get("single", []))
            for step in steps
        )
    template = config.get("chat_template")
    if (path.parent / "chat_template.jinja").exists():  # where transformers >= 4.50 saves it
        template = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return byte_level_bpe(
        tokens, merges, specials, split, ignore_merges=bool(model.get("ignore_merges")),
        normalize=(lambda s: unicodedata.normalize("NFC", s)) if normalizer == "NFC" else None,
        name=str(path),
        bos_id=bos_id, eos_id=eos_id, stop_ids=end, add_bos=add_bos, chat_template=template,
        family=_family(specials),
    )  # fmt: skip


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(1000).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def _load_llama3_tiktoken(path: Path) -> Tokenizer:
    """Meta's Llama-3 tokenizer.model: lines of `base64(token bytes) rank`; ranks are ids."""
    import tiktoken

    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a tiktoken rank line ({e})") from e
    specials = {t: len(ranks) + k for k, t in enumerate(LLAMA3_SPECIALS)}
    encoding = tiktoken.Encoding(
        path.name, pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=specials
    )
    id_to_bytes = {r: t for t, r in ranks.items()} | {i: t.encode() for t, i in specials.items()}
    return BPETokenizer(
        encoding, list(range(len(ranks) + len(specials))), id_to_bytes,
        vocab_size=len(ranks) + len(specials), bos_id=specials["<|begin_of_text|>"],
        # Without a config we cannot tell base from instruct; end of turn ends generation, and so does EOS.
        eos_id=specials["<|eot_id|>"], stop_ids=_end_ids(specials), add_bos=True, specials=specials,
        family="llama3",
    )  # fmt: skip


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: neither a tiktoken rank file nor a sentencepiece model ({e})") from e
    n = sp.get_piece_size()
    specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    bos, eos = sp.bos_id(), sp.eos_id()
    if eos < 0:
        raise ValueError(f"{path}: the sentencepiece model has no end-of-sequence token")
    config = _read_json(path.parent / "tokenizer_config.json")
    return SentencePieceTokenizer(
        sp, vocab_size=n, bos_id=bos if bos >= 0 else None, eos_id=eos, stop_ids=_end_ids(specials),
        add_bos=config.get("add_bos_token", True), specials=specials,
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
        family="llama2",
    )  # fmt: skip


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a folder (tokenizer.json, else tokenizer.model), one of those files, or a .gguf."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: it does not exist")
    if path.is_dir():
        json_path, model_path = path / "tokenizer.json", path / "tokenizer.model"
        if not model_path.exists() and (path / "original" / "tokenizer.model").exists():
            model_path = path / "original" / "tokenizer.model"  # Meta's layout in HF Llama-3 repos
        if json_path.exists():
            try:
                return _load_hf_json(json_path)
            except ValueError:
                if not model_path.exists():  # e.g. Llama-2's tokenizer.json is sentencepiece-style BPE
                    raise
        if model_path.exists():
            return load_tokenizer(model_path)
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")
    if path.suffix == ".gguf":
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # a truncated or non-GGUF file fails deep inside numpy's memmap
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
        return tokenizer_from_gguf(reader)
    if path.suffix == ".json":
        return _load_hf_json(path)
    if _is_tiktoken_file(path):
        return _load_llama3_tiktoken(path)
    return _load_sentencepiece(path)


def _render_chat(template: str, messages, add_generation_prompt: bool, **tokens) -> str:
    """Render a chat template the way transformers does (same Jinja settings, filters and globals)."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokens
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e
