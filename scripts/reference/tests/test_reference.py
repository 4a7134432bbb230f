"""Checks of the reference models themselves (CPU, float32):
  - KV shifting with weights (previous 0, current 1) is the Llama baseline;
  - the decode path (prefill, then a token at a time, raw previous k/v kept per layer) equals one forward pass;
  - a prefill in two chunks equals one;
  - the exported baseline loaded by HF transformers' LlamaForCausalLM gives the same logits (an independent
    implementation of the same equations; skipped where transformers is absent).

  python -m unittest discover -s scripts/reference/tests
"""
import os
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starref.data import induction_batch  # noqa: E402
from starref.export import export  # noqa: E402
from starref.model import DecoderLM, ModelConfig  # noqa: E402
from starref.star import star_encode, star_query  # noqa: E402


def tiny(variant, **kw):
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_position=128,
                variant=variant, tie_embeddings=False)
    base.update(kw)
    return ModelConfig(**base).validate()


class ReferenceTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.ids = torch.randint(0, 97, (2, 23))

    def test_identity_shift_is_llama(self):
        ks = DecoderLM(tiny("kvshift"), seed=3)
        ll = DecoderLM(tiny("llama"), seed=3)
        state = ll.state_dict()
        with torch.no_grad():
            for layer in ks.layers:
                layer.self_attn.k_shift.copy_(torch.tensor([[0.0, 1.0]] * 2))
                layer.self_attn.v_shift.copy_(torch.tensor([[0.0, 1.0]] * 2))
        missing = ks.load_state_dict(state, strict=False)
        self.assertEqual(sorted(missing.unexpected_keys), [])
        torch.testing.assert_close(ks(self.ids), ll(self.ids), rtol=0, atol=1e-6)

    def test_shift_changes_output(self):
        ks = DecoderLM(tiny("kvshift"), seed=3)
        ll = DecoderLM(tiny("llama"), seed=3)
        ks.load_state_dict(ll.state_dict(), strict=False)
        self.assertGreater((ks(self.ids) - ll(self.ids)).abs().max().item(), 1e-3)

    def test_decode_equals_forward(self):
        for variant in ("llama", "kvshift"):
            m = DecoderLM(tiny(variant), seed=5).eval()
            full = m(self.ids[:1])
            caches = m.new_caches()
            steps = [m(self.ids[:1, :7], caches=caches)]
            for t in range(7, self.ids.shape[1]):
                steps.append(m(self.ids[:1, t:t + 1], caches=caches))
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5, msg=variant)

    def test_chunked_prefill_equals_forward(self):
        for variant in ("llama", "kvshift"):
            m = DecoderLM(tiny(variant), seed=7).eval()
            full = m(self.ids)
            caches = m.new_caches()
            a = m(self.ids[:, :10], caches=caches)
            b = m(self.ids[:, 10:], caches=caches)
            torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=0, atol=2e-5, msg=variant)

    def test_first_token_has_no_predecessor(self):
        # k_{-1} = v_{-1} = 0: the first position's output depends on the current-token weights only.
        m = DecoderLM(tiny("kvshift"), seed=9).eval()
        before = m(self.ids[:, :1])
        with torch.no_grad():
            for layer in m.layers:
                layer.self_attn.k_shift[:, 0] += 0.5
                layer.self_attn.v_shift[:, 0] -= 0.5
        torch.testing.assert_close(m(self.ids[:, :1]), before, rtol=0, atol=0)
        self.assertGreater((m(self.ids) - DecoderLM(tiny("kvshift"), seed=9)(self.ids)).abs().max().item(), 1e-4)

    def test_hf_llama_loads_the_export(self):
        try:
            from transformers import LlamaForCausalLM
        except ImportError:
            self.skipTest("transformers is not installed")
        m = DecoderLM(tiny("llama"), seed=11).eval()
        with tempfile.TemporaryDirectory() as d:
            export(m, None, d)
            hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                ref = hf(self.ids).logits
        torch.testing.assert_close(m(self.ids), ref, rtol=0, atol=2e-5)

    def test_star_one_block_is_global(self):
        ids = self.ids[0].tolist()
        for variant in ("llama", "kvshift"):
            m = DecoderLM(tiny(variant), seed=13).eval()
            enc = star_encode(m, ids[:17], 17)
            q, _, _ = star_query(m, enc, ids[17:])
            with torch.no_grad():
                full = m(self.ids[:1])[0]
            torch.testing.assert_close(torch.cat([enc["logits"], q]), full, rtol=0, atol=2e-5, msg=variant)

    def test_star_halo_is_the_true_predecessor(self):
        # Blocks of 7: block 3 (tokens 14..20) sees the anchor (tokens 0..6) and itself. Its first token mixes with
        # token 13, the true previous context token (the halo), so changing token 13 changes block 3 under KV
        # shifting and leaves it alone in the baseline, where nothing of block 2 reaches block 3.
        ids = self.ids[0].tolist()[:21]
        other = list(ids)
        other[13] = (ids[13] + 1) % 97
        for variant, changes in (("kvshift", True), ("llama", False)):
            m = DecoderLM(tiny(variant), seed=15).eval()
            a, b = star_encode(m, ids, 7)["logits"], star_encode(m, other, 7)["logits"]
            diff = (a[14:] - b[14:]).abs().max().item()
            if changes:
                self.assertGreater(diff, 1e-4, variant)
            else:
                self.assertEqual(diff, 0.0, variant)
            torch.testing.assert_close(a[:13], b[:13], rtol=0, atol=0)

    def test_induction_distance_varies(self):
        x, y, scored = induction_batch(3, 16, 8, 50, 0, "cpu")
        seq = torch.cat([x, y[:, -1:]], 1)
        dists = set()
        for r in range(16):
            b = int(scored[r].nonzero()[0])  # the copy starts at b (its first token is not scored)
            copy = seq[r, b:b + 8]
            a = next(a for a in range(1, b - 7) if torch.equal(seq[r, a:a + 8], copy))
            dists.add(b - a)
        self.assertGreater(len(dists), 3)
        self.assertTrue(all(8 <= d <= 16 for d in dists))


if __name__ == "__main__":
    unittest.main()
