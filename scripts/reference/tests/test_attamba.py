"""Checks of the Attamba reference (starref/attamba.py, docs/specs/attamba.md), CPU, float32:
  - the mask and the boundaries on hand-worked cases (cyclic offsets, position 0);
  - the SSD's sequential recurrence equals its parallel per-chunk form, from any start position and carry;
  - the SSM is chunk-local: tokens before a chunk start change nothing of that chunk's SSM output;
  - dense oracle == token-by-token decode == chunked prefill at arbitrary split points (P = 4 and 8, with and
    without cyclic offsets, L in {0, 3, 16}); the decode cache holds only boundary k/v and a ring of L;
  - Star Attention: block >= context and exact mode equal global; two blocks with anchor = block equal global; the
    halo (ring + straddling SSM state) carries exactly what it should; block sizes not a multiple of P are refused;
  - the export's names, shapes, storage types and config keys are the spec's, and load back to the same model;
  - tests/golden/attamba holds what this reference computes from its stored model.

  python -m unittest discover -s scripts/reference/tests
"""
import json
import os
import random
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starref import attamba  # noqa: E402
from starref.export import export  # noqa: E402
from starref.golden import load_exported  # noqa: E402
from starref.model import DecoderLM, ModelConfig  # noqa: E402
from starref.star import star_encode, star_query  # noqa: E402

VOCAB = 97


def tiny(P=4, L=3, cyclic=True, n_layers=3, **kw):
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=4, ffn_dim=64,
                max_position=256, variant="attamba", tie_embeddings=False, init_std=0.25, attamba_chunk=P,
                attamba_leading=L, attamba_cyclic_offsets=cyclic, ssm_d_inner=16, ssm_d_state=8, ssm_heads=4,
                ssm_groups=2)
    base.update(kw)
    return ModelConfig(**base).validate()


def decode_all(m, ids, splits):
    """Logits of ids [B, T] through the decode path, prefilling the pieces between the split points."""
    caches = m.new_caches()
    cuts = [0] + sorted(splits) + [ids.shape[1]]
    return torch.cat([m(ids[:, a:b], caches=caches) for a, b in zip(cuts, cuts[1:]) if b > a], 1), caches


class MaskTest(unittest.TestCase):
    def test_offsets(self):
        # off_l = min(P-1, l * (P // n_layers))
        self.assertEqual([attamba.layer_offset(tiny(P=8), l) for l in range(3)], [0, 2, 4])
        self.assertEqual([attamba.layer_offset(tiny(P=4), l) for l in range(3)], [0, 1, 2])
        self.assertEqual([attamba.layer_offset(tiny(P=4, n_layers=2), l) for l in range(2)], [0, 2])
        self.assertEqual([attamba.layer_offset(tiny(P=8, cyclic=False), l) for l in range(3)], [0, 0, 0])
        self.assertEqual([attamba.layer_offset(tiny(P=2, n_layers=5), l) for l in range(5)], [0] * 5)

    def test_boundaries_and_mask_by_hand(self):
        # P = 4, off = 1: chunk ids (p + 1) // 4 -> chunks {0,1,2}, {3..6}, {7..10}, ...; boundaries 2, 6, 10 and 0.
        pos = torch.arange(12)
        self.assertEqual(attamba.boundary_flags(pos, 4, 1).nonzero().flatten().tolist(), [0, 2, 6, 10])
        self.assertEqual((attamba.chunk_phase(pos, 4, 1) == 0).nonzero().flatten().tolist(), [3, 7, 11])
        m = attamba.dense_mask(pos, 4, 1, 2)
        # Query 9 with L = 2: the band 7, 8, 9 and the boundaries before 7: 0, 2, 6.
        self.assertEqual(m[9].nonzero().flatten().tolist(), [0, 2, 6, 7, 8, 9])
        # Query 2: the band 0..2 only (no boundary lies before 0).
        self.assertEqual(m[2].nonzero().flatten().tolist(), [0, 1, 2])
        # off = 0, L = 0: query 11 sees itself and the boundaries 0, 3, 7 (11 is itself a boundary: in the band).
        self.assertEqual(attamba.dense_mask(pos, 4, 0, 0)[11].nonzero().flatten().tolist(), [0, 3, 7, 11])

    def test_partials_merge_to_dense_attention(self):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
        k, v = torch.cat([k, torch.randn(1, 2, 4, 8, generator=g)], 2), torch.cat([v, v[:, :, :4] * 2], 2)
        mask = torch.rand(5, 9, generator=g) > 0.4
        mask[:, 0] = True
        split = torch.rand(9, generator=g) > 0.5
        parts = [attamba.partial_attention(q, k[:, :, s], v[:, :, s], mask[:, s]) for s in (split, ~split)]
        parts.append(attamba.partial_attention(q, k[:, :, :0], v[:, :, :0], mask[:, :0]))  # an empty shard
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(attamba.merge_partials(parts), ref, rtol=0, atol=1e-6)


class SSDTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.cfg = tiny(P=8)

    def ssd(self, seed=1):
        m = DecoderLM(self.cfg, seed=seed)
        return m.layers[0].self_attn.k_ssm.eval()

    @torch.no_grad()
    def test_scan_equals_parallel_form(self):
        s = self.ssd()
        h = torch.randn(2, 37, self.cfg.d_model)
        for off in (0, 3, 7):
            for p0 in (0, 5, 8, 13):
                st = None
                if p0:
                    _, st = s.scan(torch.randn(2, 11, self.cfg.d_model), p0 - 11, off)
                ys, ss = s.scan(h, p0, off, st)
                yf, sf = s(h, p0, off, st, need_state=True)
                msg = f"off {off} p0 {p0}"
                torch.testing.assert_close(yf, ys, rtol=0, atol=1e-5, msg=msg)
                torch.testing.assert_close(sf["S"], ss["S"], rtol=0, atol=1e-5, msg=msg)
                torch.testing.assert_close(sf["conv"], ss["conv"], rtol=0, atol=0, msg=msg)

    @torch.no_grad()
    def test_chunk_local(self):
        s = self.ssd()
        P = self.cfg.attamba_chunk
        h = torch.randn(1, 40, self.cfg.d_model)
        for off in (0, 2, 5):
            start = next(p for p in range(9, 40) if (p + off) % P == 0)
            h2 = h.clone()
            h2[:, :start] = torch.randn(1, start, self.cfg.d_model)
            a, _ = s(h, 0, off)
            b, _ = s(h2, 0, off)
            # Every chunk from `start` on is untouched; the chunk before it does change.
            torch.testing.assert_close(a[:, start:], b[:, start:], rtol=0, atol=0)
            self.assertGreater((a[:, start - 1] - b[:, start - 1]).abs().max().item(), 1e-3)
            a, _ = s.scan(h, 0, off)
            b, _ = s.scan(h2, 0, off)
            torch.testing.assert_close(a[:, start:], b[:, start:], rtol=0, atol=0)

    @torch.no_grad()
    def test_state_used_only_inside_a_chunk(self):
        s = self.ssd()
        h = torch.randn(1, 6, self.cfg.d_model)
        junk = dict(conv=torch.randn(1, s.conv_dim, s.W - 1), S=torch.randn(1, s.H, s.Pd, s.N))
        # p0 = 8 with off 0 starts a chunk: the carry must be ignored; p0 = 9 is inside one: it must be used.
        torch.testing.assert_close(s(h, 8, 0, junk)[0], s(h, 8, 0, None)[0], rtol=0, atol=0)
        torch.testing.assert_close(s.scan(h, 8, 0, junk)[0], s.scan(h, 8, 0, None)[0], rtol=0, atol=0)
        self.assertGreater((s(h, 9, 0, junk)[0] - s(h, 9, 0, None)[0]).abs().max().item(), 1e-3)


class DecodeTest(unittest.TestCase):
    @torch.no_grad()
    def test_dense_equals_decode_equals_chunked_prefill(self):
        rng = random.Random(3)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, VOCAB, (2, 45), generator=g)
        for P in (4, 8):
            for cyclic in (True, False):
                for L in (0, 3, 16):
                    m = DecoderLM(tiny(P=P, L=L, cyclic=cyclic), seed=P + L).eval()
                    full = m(ids)
                    msg = f"P {P} cyclic {cyclic} L {L}"
                    step, _ = decode_all(m, ids, list(range(1, 45)))
                    torch.testing.assert_close(step, full, rtol=0, atol=5e-5, msg=msg + " token by token")
                    for _ in range(3):
                        cuts = rng.sample(range(1, 45), 4)
                        pre, _ = decode_all(m, ids, cuts)
                        torch.testing.assert_close(pre, full, rtol=0, atol=5e-5, msg=f"{msg} splits {sorted(cuts)}")
                    # Splits one token into a chunk and one token before its end.
                    pre, _ = decode_all(m, ids, [P + 1, 3 * P - 1, 3 * P + 2])
                    torch.testing.assert_close(pre, full, rtol=0, atol=5e-5, msg=msg + " mid-chunk splits")

    @torch.no_grad()
    def test_cache_holds_boundaries_and_a_ring(self):
        m = DecoderLM(tiny(P=8, L=5), seed=2).eval()
        ids = torch.randint(0, VOCAB, (1, 50))
        _, caches = decode_all(m, ids, [7, 20, 21])
        for layer, c in zip(m.layers, caches):
            off = layer.self_attn.off
            want = [p for p in range(50) if p == 0 or (p + off) % 8 == 7]
            self.assertEqual(c["bpos"].tolist(), want)
            self.assertEqual(c["kb"].shape[2], len(want))
            self.assertEqual(c["ring_k"].shape[2], 5)
            self.assertEqual(c["n"], 50)
            self.assertEqual(c["k_ssm"]["S"].dtype, torch.float32)

    @torch.no_grad()
    def test_ssm_path_matters(self):
        m = DecoderLM(tiny(P=4, L=3), seed=4).eval()
        ids = torch.randint(0, VOCAB, (1, 30))
        a = m(ids)
        for layer in m.layers:
            layer.self_attn.k_ssm.out_proj.weight.zero_()
        self.assertGreater((m(ids) - a).abs().max().item(), 1e-2)

    @torch.no_grad()
    def test_generate_runs_the_decode_path(self):
        m = DecoderLM(tiny(P=4, L=3), seed=6).eval()
        ids = torch.randint(0, VOCAB, (1, 11))
        out = m.generate(ids, 9)
        seq = ids[0].tolist()
        for t in out:
            self.assertEqual(t, int(m(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(t)


class StarTest(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (1, 53), generator=g)

    def star(self, m, n_ctx, block, anchor=None, exact=False, ids=None):
        ids = (self.ids if ids is None else ids)[0].tolist()
        enc = star_encode(m, ids[:n_ctx], block, anchor, exact)
        q, _, _ = star_query(m, enc, ids[n_ctx:])
        return torch.cat([enc["logits"], q])

    @torch.no_grad()
    def test_block_covering_the_context_is_global(self):
        for P, L in ((4, 3), (8, 16)):
            m = DecoderLM(tiny(P=P, L=L), seed=7).eval()
            torch.testing.assert_close(self.star(m, 45, 48), m(self.ids)[0], rtol=0, atol=5e-5)

    @torch.no_grad()
    def test_exact_mode_is_global(self):
        for P, L, block, cyclic in ((4, 3, 8, True), (8, 16, 8, True), (8, 5, 16, False), (4, 0, 4, True)):
            m = DecoderLM(tiny(P=P, L=L, cyclic=cyclic), seed=9).eval()
            torch.testing.assert_close(self.star(m, 45, block, exact=True), m(self.ids)[0], rtol=0, atol=5e-5,
                                       msg=f"P {P} L {L} block {block}")

    @torch.no_grad()
    def test_two_blocks_with_a_full_anchor_are_global(self):
        # Block 2 sees c1's boundaries (the anchor) and the halo: everything global attention gives it.
        m = DecoderLM(tiny(P=4, L=3), seed=11).eval()
        torch.testing.assert_close(self.star(m, 40, 20, 20), m(self.ids)[0], rtol=0, atol=5e-5)

    @torch.no_grad()
    def test_star_differs_from_global(self):
        m = DecoderLM(tiny(P=4, L=3), seed=11).eval()
        full = m(self.ids)[0]
        s = self.star(m, 48, 12, 8)
        # c1 is global; so is c2's first token (its band is the halo and no boundary of 8..11 lies before 12 - L in
        # any layer); from there on c2 misses the boundaries of tokens 8..11, which lie outside the anchor.
        torch.testing.assert_close(s[:13], full[:13], rtol=0, atol=5e-5)
        self.assertGreater((s[13:] - full[13:]).abs().max().item(), 1e-3)

    @torch.no_grad()
    def test_halo(self):
        # Blocks of 8 (P = 4): c3 is tokens 16..23; the anchor is tokens 0..3. Token 14 lies in c2 (not the anchor).
        # With L = 0 and no offsets nothing of c2 reaches c3 in phase 1; with L = 3 the ring does, and with offsets
        # (off = 1, 2 in layers 1, 2) the SSM state of the chunk straddling position 16 does too.
        other = self.ids.clone()
        other[0, 14] = (other[0, 14] + 1) % VOCAB
        for L, cyclic, reaches in ((0, False, False), (3, False, True), (0, True, True)):
            m = DecoderLM(tiny(P=4, L=L, cyclic=cyclic), seed=13).eval()
            ctx = self.ids[0, :24].tolist()
            a = star_encode(m, ctx, 8, 4)["logits"]
            b = star_encode(m, other[0, :24].tolist(), 8, 4)["logits"]
            diff = (a[16:] - b[16:]).abs().max().item()
            msg = f"L {L} cyclic {cyclic}"
            if reaches:
                self.assertGreater(diff, 1e-4, msg)
            else:
                self.assertEqual(diff, 0.0, msg)
            torch.testing.assert_close(a[:14], b[:14], rtol=0, atol=0)

    def test_block_not_a_multiple_of_the_chunk_is_refused(self):
        m = DecoderLM(tiny(P=4), seed=1).eval()
        with self.assertRaises(ValueError):
            star_encode(m, self.ids[0, :20].tolist(), 6)


class ExportTest(unittest.TestCase):
    @torch.no_grad()
    def test_names_shapes_and_config(self):
        from safetensors.torch import load_file

        cfg = tiny(P=8, L=5)
        m = DecoderLM(cfg, seed=3).eval()
        with tempfile.TemporaryDirectory() as d:
            export(m, None, d, "bfloat16")
            with open(os.path.join(d, "config.json")) as f:
                c = json.load(f)
            t = load_file(os.path.join(d, "model.safetensors"))
            back = load_exported(d)
        self.assertEqual((c["model_type"], c["architectures"]), ("attamba", ["AttambaForCausalLM"]))
        want = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                    attamba_chunk_size=8, attamba_leading_tokens=5, attamba_cyclic_offsets=True, ssm_d_inner=16,
                    ssm_d_state=8, ssm_n_heads=4, ssm_n_groups=2, ssm_conv_width=4, intermediate_size=64,
                    vocab_size=VOCAB, tie_word_embeddings=False)
        self.assertEqual({k: c[k] for k in want}, want)
        for k in ("rms_norm_eps", "rope_theta", "max_position_embeddings"):
            self.assertIn(k, c)
        d_in, N, H, G, W, dim = 16, 8, 4, 2, 4, 32
        conv_dim = d_in + 2 * G * N
        for n in range(3):
            pre = f"model.layers.{n}.self_attn."
            self.assertNotIn(pre + "k_proj.weight", t)
            self.assertNotIn(pre + "v_proj.weight", t)
            self.assertEqual(t[pre + "q_proj.weight"].dtype, torch.bfloat16)
            for s in ("k_ssm", "v_ssm"):
                shapes = {"in_proj.weight": (2 * d_in + 2 * G * N + H, dim), "conv1d.weight": (conv_dim, 1, W),
                          "conv1d.bias": (conv_dim,), "dt_bias": (H,), "A_log": (H,), "D": (H,),
                          "norm.weight": (d_in,), "out_proj.weight": (dim, d_in)}
                for name, shape in shapes.items():
                    x = t[pre + s + "." + name]
                    self.assertEqual(tuple(x.shape), shape, name)
                    big = name in ("in_proj.weight", "out_proj.weight")
                    self.assertEqual(x.dtype, torch.bfloat16 if big else torch.float32, name)
        self.assertEqual(len([k for k in t if "_ssm." in k]), 3 * 2 * 8)
        # The bf16 export loads back as the model with its big matrices rounded and its small SSM tensors exact.
        self.assertTrue(torch.equal(back.layers[1].self_attn.v_ssm.A_log, m.layers[1].self_attn.v_ssm.A_log))
        self.assertTrue(torch.equal(back.layers[1].self_attn.q_proj.weight,
                                    m.layers[1].self_attn.q_proj.weight.bfloat16().float()))

    @torch.no_grad()
    def test_float32_round_trip(self):
        m = DecoderLM(tiny(P=4, L=3, cyclic=False), seed=3).eval()
        ids = torch.randint(0, VOCAB, (1, 20))
        with tempfile.TemporaryDirectory() as d:
            export(m, None, d)
            back = load_exported(d)
        self.assertFalse(back.cfg.attamba_cyclic_offsets)
        torch.testing.assert_close(back(ids), m(ids), rtol=0, atol=0)


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "golden", "attamba")


class GoldenTest(unittest.TestCase):
    """tests/golden/attamba (starref.golden attamba-tiny) is what this reference computes from the stored model."""

    @torch.no_grad()
    def test_golden_matches_the_reference(self):
        with open(os.path.join(GOLDEN, "golden.json")) as f:
            g = json.load(f)
        m = load_exported(os.path.join(GOLDEN, "hf"))
        self.assertEqual([layer.self_attn.off for layer in m.layers], g["layer_offsets"])
        self.assertEqual(g["layer_offsets"], [0, 2, 4])
        for p in g["prompts"]:
            lg = m(torch.tensor([p["token_ids"]]))[0]
            torch.testing.assert_close(lg[p["rows"]], torch.tensor(p["row_logits"]), rtol=0, atol=2e-4)
        for e in g["greedy"]:
            self.assertEqual(m.generate(torch.tensor([e["prompt_ids"]]), len(e["generated_ids"])), e["generated_ids"])
        e = next(e for e in g["star"] if not e["exact"] and e["block"] == 24)
        enc = star_encode(m, e["context_ids"], e["block"], e["anchor"])
        q, gen, _ = star_query(m, enc, e["query_ids"], len(e["generated_ids"]))
        torch.testing.assert_close(q[-1], torch.tensor(e["last_logits"]), rtol=0, atol=2e-4)
        self.assertEqual(gen, e["generated_ids"])


if __name__ == "__main__":
    unittest.main()
