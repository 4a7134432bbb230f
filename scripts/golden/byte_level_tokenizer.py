#!/usr/bin/env python3
"""Writes a byte-level BPE tokenizer.json of 256 ids, every byte one token and no merges (GPT-2's byte-to-character
table), for the tiny golden models whose prompts are token ids: it lets the server load them (tests/e2e) and
scripts/lnfree_to_gguf.py put a tokenizer into their GGUF. Usage: byte_level_tokenizer.py OUT.json"""
import json, sys
printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
table, extra = {}, 0
for b in range(256):
    if b in printable:
        table[b] = chr(b)
    else:
        table[b] = chr(256 + extra)
        extra += 1
vocab = {table[b]: b for b in range(256)}
byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                     "merges": []}}, open(sys.argv[1], "w"))
