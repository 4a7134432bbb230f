#!/usr/bin/env python3
"""Golden token ids and chat renderings for starserve's tokenizer tests, made with Hugging Face libraries.

Run with the golden venv (transformers + tokenizers + gguf):
    /opt/golden-venv/bin/python scripts/make_tokenizer_golden.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs (all under tests/golden/):
  tokenizer/smollm2.json        ids for CASES with the true SmolLM2 tokenizer (see "Reference tokenizer" below)
  tokenizer/llama3_style.json   the same vocab/merges behind a Llama-3 pre-tokenizer (regex split + ByteLevel without
                                regex, ignore_merges like Llama-3), so the llama3 regex path is checked on a real vocab
  tokenizer/qwen2_style.json    the same with the Qwen2 regex (single digits)
  tokenizer/tiny.tokenizer.json a ~400-token BPE trained here on TRAIN_TEXT, Llama-3 style, with added tokens; it checks
  tokenizer/tiny_tokenizer_config.json  the tokenizer.json + tokenizer_config.json loading path
  tokenizer/tiny.json           ids for CASES with that tiny tokenizer (add_special_tokens=True, so BOS included)
  chat/*.json                   apply_chat_template(..., tokenize=False) renderings: the GGUF's own template (smollm2)
                                and hand-written templates of the chatml / qwen / llama3 / llama2 / mistral / gemma
                                families (CHAT_TEMPLATES below)

Reference tokenizer. The SmolLM2 tokenizer.json pre-tokenizes with
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)], i.e. every digit is its own
piece before the GPT-2 regex runs (llama.cpp calls this pre-tokenizer "smollm"). The tokenizer that transformers builds
from the GGUF file (AutoTokenizer.from_pretrained(..., gguf_file=...)) was checked when this script was written
(transformers 5.x): its pre-tokenizer is ByteLevel(use_regex=True) alone, with no Digits step, so it is NOT the true
SmolLM2 tokenizer. It differs for instance on "hello   123" (GPT-2 regex keeps the space before the digits attached to
them). The script therefore builds the reference itself with the `tokenizers` library: BPE model from the GGUF vocab and
merges (read with the `gguf` package), the real SmolLM2 pre-tokenizer, ByteLevel decoder, and the GGUF's control tokens
as special added tokens. It prints the pre-tokenizer of the GGUF-built tokenizer and the strings on which the two
disagree, and records that in the "notes" field of smollm2.json.
"""

import argparse
import json
import os
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

LONG_PARAGRAPH = (
    "The lighthouse keeper kept a ledger of every ship that passed the headland, noting the hour, the wind and the "
    "colour of the sails. Over forty-one years the ledger grew to 17 volumes and 12,408 entries; the last one, written "
    "in a shaky hand on 3 March 1911, reads simply: \"Fog. No ships. Kettle boiled twice.\" Historians who later read "
    "the volumes were struck less by the ships than by the small domestic notes in the margins - a recipe for plum "
    "jam, the names of the keeper's cats (Admiral, Biscuit and Mrs. Pettigrew), and a running tally of the gulls that "
    "nested on the gallery rail. It's a reminder that records we'd call 'dry' often hold a life between the lines.")

CASES = [
    "Hello world",
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "Héllo, wörld! Ça va? Ñandú, açaí, crème brûlée.",
    "日本語のテキストです。中文也可以。",
    "한국어 텍스트를 토큰화합니다",
    "emoji 😀🎉 and ZWJ 👨‍👩‍👧‍👦 family, flag 🇯🇵, skin tone 👍🏽",
    "def foo(x):\n    if x > 0:\n        return x * 2\n\treturn -x\n",
    "a  b   c    d     e",
    "tabs\t\tand\nnewlines\n\n\nend",
    "\n\n\n",
    "numbers 1234567890 and 3.14159 and 1,000,000 and 007",
    "hello   123 and x  42",
    "I'm sure you'll see it's John's; we've, they're, I'd",
    "MiXeD CaSe WoRdS, ALLCAPS, I'M SURE YOU'LL SEE IT'S",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> in the middle",
    "<|im_start|><|im_end|>",
    "broken <|im_start special and <|im_end |> and <|im_end|",
    LONG_PARAGRAPH,
    "https://example.com/path/to?query=1&x=y#frag",
    "email@example.com, C++ std::vector<int> v{1, 2, 3};",
    "Русский текст и українська мова",
    "العربية نص قصير",
    "हिन्दी पाठ",
    "x²+y³=z⁴, ½ ¾, ①②③, Ⅻ",
    "   \n   \n\t \n",
    "ideographic\u3000space and nbsp\u00a0here",
    "$$$ %%% ^^^ &&& *** !!!???",
    "a\r\nb\r\n\r\nc",
    "0",
    "trailing newline\n",
    "\"quoted\" and `backticks` and (parens) [brackets] {braces}",
    "zero\u200bwidth and lone joiner \u200d here",
    "∑∫√∞≠≈ ∀x∈ℝ",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "    indented four\n        indented eight",
    # Bytes whose byte-level character is missing from SmolLM2's vocabulary (0x04; 0xF1, the lead byte of U+40000):
    # Hugging Face BPE without an unknown token drops them, so these two do not decode back to the text.
    "control a\x04b char",
    "plane four x\U00040000y",
]

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs into the woods.",
    "Tokenizers split text into pieces; byte pairs that appear often are merged into new tokens, again and again.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "In 2024 the team measured 1234 requests per second on 8 machines, and 5678 on 16 of them.",
    "She said: \"I'm here, you're there, and we'll meet when it's done.\" They'd agreed long ago.",
    "Caf\u00e9s in Z\u00fcrich serve cr\u00e8me br\u00fbl\u00e9e; \u65e5\u672c\u8a9e and emoji \U0001F600 appear too.",
] * 4

TINY_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TINY_USER_DEFINED = ["<tool>"]
TINY_CASES_EXTRA = [
    "<|begin_of_text|>hello<|eot_id|>",
    "call <tool> now and <tool>twice<tool>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>",
]

# Chat templates written for this project in the style of each family's published template; the C++ ChatTemplate
# reproduces these renderings exactly.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "qwen": (
        "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + "
        "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    "mistral": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
        "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{% if loop.first and system_message != '' %}"
        "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + "
        "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
}
CHAT_SPECIALS = {
    "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "qwen": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thank you"}],
    [{"role": "user", "content": "  padded question with spaces \n"},
     {"role": "assistant", "content": "\n padded answer  "}, {"role": "user", "content": "日本語で？ 😀"}],
]


def read_gguf_vocab(path):
    reader = GGUFReader(path)

    def strings(key):
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokens = strings("tokenizer.ggml.tokens")
    type_field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(type_field.parts[i][0]) for i in type_field.data]
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": scalar("tokenizer.ggml.pre"),
            "chat_template": scalar("tokenizer.chat_template")}


def build_bpe_tokenizer(vocab, pre_tokenizer, ignore_merges):
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab["tokens"])}, merges=vocab["merges"],
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(vocab["tokens"], vocab["types"]) if ty == 3]
    tok.add_special_tokens(control)
    return tok


def encode_cases(tok, add_special_tokens):
    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True  # special tokens in the text are tokenized as ordinary text
    cases = []
    for text in CASES + (TINY_CASES_EXTRA if add_special_tokens else []):
        ids = tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids_plain = plain.encode(text, add_special_tokens=add_special_tokens).ids
        body = ids[1:] if add_special_tokens else ids  # the tiny tokenizer's post-processor prepends BOS
        case = {"text": text, "ids": ids, "ids_plain": ids_plain}
        if tok.decode(body, skip_special_tokens=False) != text:
            assert "\x04" in text or "\U00040000" in text, repr(text)
            case["lossy"] = True  # bytes without a token were dropped
        cases.append(case)
    return cases


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # One line per case keeps the files readable and the diffs small.
    lines = []
    for key, value in obj.items():
        if key == "cases":
            body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in value)
            lines.append(f' "cases": [\n{body}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    json.load(open(path, encoding="utf-8"))  # the hand-joined text must still be valid JSON
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def make_smollm2_goldens(model_path, vocab):
    from transformers import AutoTokenizer

    hf_gguf = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    gguf_pre = str(hf_gguf.backend_tokenizer.pre_tokenizer)
    print("transformers' GGUF tokenizer pre_tokenizer:", gguf_pre)

    reference = build_bpe_tokenizer(
        vocab, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        ignore_merges=False)
    cases = encode_cases(reference, add_special_tokens=False)
    differ = [c["text"] for c in cases if hf_gguf.encode(c["text"], add_special_tokens=False) != c["ids"]]
    print(f"transformers' GGUF tokenizer differs from the reference on {len(differ)} of {len(cases)} strings:")
    for text in differ:
        print("   ", repr(text)[:80])
    notes = (f"transformers' GGUF-built tokenizer has pre_tokenizer {gguf_pre} (no Digits step) and differs from the "
             f"true SmolLM2 tokenizer on {len(differ)} of {len(cases)} strings; the reference here is built with "
             "Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].")
    write_json(os.path.join(GOLDEN, "tokenizer", "smollm2.json"), {
        "source": f"tokenizers {__import__('tokenizers').__version__}: BPE from {os.path.basename(model_path)} "
                  "vocab/merges, SmolLM2 pre-tokenizer, control tokens as special added tokens",
        "pre": vocab["pre"], "notes": notes, "differs_from_transformers_gguf": differ, "cases": cases})

    for name, pattern, ignore_merges in (("llama3_style", LLAMA3_PATTERN, True), ("qwen2_style", QWEN2_PATTERN, False)):
        tok = build_bpe_tokenizer(vocab, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), ignore_merges=ignore_merges)
        write_json(os.path.join(GOLDEN, "tokenizer", f"{name}.json"), {
            "source": f"tokenizers {__import__('tokenizers').__version__}: SmolLM2 GGUF vocab/merges behind "
                      f"Split(Regex, isolated) + ByteLevel(use_regex=False), ignore_merges={ignore_merges}",
            "pattern": pattern, "ignore_merges": ignore_merges, "cases": encode_cases(tok, add_special_tokens=False)})

    # Chat: the GGUF's own template through transformers, plus token ids of the rendering with the reference tokenizer.
    chat_cases = []
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            text = hf_gguf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                               chat_template=vocab["chat_template"])
            chat_cases.append({"messages": msgs, "add_generation_prompt": gen, "text": text,
                               "ids": reference.encode(text, add_special_tokens=False).ids})
    write_json(os.path.join(GOLDEN, "chat", "smollm2.json"), {
        "source": "transformers apply_chat_template(tokenize=False) with the GGUF's tokenizer.chat_template; ids from "
                  "the reference tokenizer of tokenizer/smollm2.json",
        "family": "chatml", "template": vocab["chat_template"], "cases": chat_cases})

    for family, template in CHAT_TEMPLATES.items():
        cases = []
        for msgs in CONVERSATIONS:
            for gen in (True, False):
                text = hf_gguf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                   chat_template=template, **CHAT_SPECIALS[family])
                cases.append({"messages": msgs, "add_generation_prompt": gen, "text": text})
        write_json(os.path.join(GOLDEN, "chat", f"{family}.json"), {
            "source": "transformers apply_chat_template(tokenize=False) with the hand-written template below",
            "family": family, "template": template, "special_tokens": CHAT_SPECIALS[family], "cases": cases})


def make_tiny_goldens():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=TINY_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_USER_DEFINED])
    bos = TINY_SPECIAL[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    # Llama-3's tokenizer.json sets ignore_merges; do the same so the C++ reads and honours the flag.
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))

    path = os.path.join(GOLDEN, "tokenizer", "tiny.tokenizer.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path, pretty=True)
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes, vocab {tok.get_vocab_size()})")
    write_json(os.path.join(GOLDEN, "tokenizer", "tiny_tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos,
        "eos_token": {"content": "<|eot_id|>", "special": True}, "chat_template": CHAT_TEMPLATES["llama3"]})
    write_json(os.path.join(GOLDEN, "tokenizer", "tiny.json"), {
        "source": f"tokenizers {__import__('tokenizers').__version__}: tiny.tokenizer.json, "
                  "encode(text, add_special_tokens=True)",
        "cases": encode_cases(tok, add_special_tokens=True)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = parser.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"{args.model} not found; run scripts/test.sh (it fetches the model) or pass --model")
    vocab = read_gguf_vocab(args.model)
    make_smollm2_goldens(args.model, vocab)
    make_tiny_goldens()


if __name__ == "__main__":
    main()
