"""Checks of starref/gpt2.py (CPU, float32):
  - the baseline exported in the HF GPT-2 layout loads into transformers' GPT2LMHeadModel with the same logits;
  - LN-free with every temperature 1 equals LN-free without temperatures, and other temperatures change it;
  - the fused d×d FFN equals the two-matrix linear FFN (and folds weight / spectral normalisation);
  - the entropy statistic equals −Σ p log p of the softmax probabilities, recomputed here from q and k;
  - the regulariser is zero when every |δ| ≤ γ log T and δ² beyond;
  - export → reload gives the same logits; cached decode equals one forward pass;
  - tests/golden/lnfree (starref.golden lnfree) is what the reference computes from its files.

  cd scripts/reference && python -m unittest discover -s tests
"""
import json
import math
import os
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starref.gpt2 import (GPT2Config, GPT2LM, attention_entropy, entropy_penalty, export_gpt2,  # noqa: E402
                          load_exported_gpt2)


def tiny(variant="lnfree", **kw):
    base = dict(vocab_size=97, n_positions=40, d_model=48, n_layers=3, n_heads=4, ffn_dim=80, variant=variant,
                init_std=0.1)
    base.update(kw)
    return GPT2Config(**base).validate()


def perturb(model, seed=11):
    """Non-trivial α, β, temperatures, biases and LayerNorm parameters (the constructor leaves them 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta", "temperature")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g) * 1.5)
            elif name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


class GPT2Test(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.ids = torch.randint(0, 97, (2, 29))

    def test_hf_gpt2_loads_the_baseline_export(self):
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            self.skipTest("transformers not installed")
        m = perturb(GPT2LM(tiny("baseline"), seed=2)).eval()
        with tempfile.TemporaryDirectory() as d:
            export_gpt2(m, None, d)
            with open(os.path.join(d, "config.json")) as f:
                self.assertEqual(json.load(f)["model_type"], "gpt2")
            hf = GPT2LMHeadModel.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(self.ids).logits
        self.assertGreater(ref.abs().max().item(), 0.1)
        torch.testing.assert_close(m(self.ids), ref, rtol=0, atol=2e-5)

    def test_temperature_one_is_no_temperature(self):
        plain = perturb(GPT2LM(tiny(), seed=3)).eval()
        temp = GPT2LM(tiny(temperature=True), seed=3).eval()
        r = temp.load_state_dict(plain.state_dict(), strict=False)
        self.assertEqual(r.unexpected_keys, [])
        self.assertEqual(sorted(r.missing_keys), [f"h.{i}.attn.temperature" for i in range(3)])
        torch.testing.assert_close(temp(self.ids), plain(self.ids), rtol=0, atol=1e-6)
        with torch.no_grad():
            temp.h[1].attn.temperature[2, 5:] = 0.1
        self.assertGreater((temp(self.ids) - plain(self.ids)).abs().max().item(), 1e-3)

    def test_temperature_divides_the_logits_of_its_row(self):
        # Temperature t at (head h, position i) equals scaling row i of that head's q by 1/t.
        m = perturb(GPT2LM(tiny(temperature=True, n_layers=1), seed=4)).eval()
        x = torch.randn(1, 10, 48)
        pos = torch.arange(10)
        with torch.no_grad():
            _, probs = m.h[0].attn(x, pos, need="probs")
            q, k, _ = m.h[0].attn.c_attn(x).split(48, dim=-1)
            q = q.view(1, 10, 4, 12).transpose(1, 2).double()
            k = k.view(1, 10, 4, 12).transpose(1, 2).double()
            t = m.h[0].attn.temperature[:, :10].double()
            s = (q @ k.transpose(-1, -2)) / math.sqrt(12) / t[None, :, :, None]
            s = s.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(probs.double(), torch.softmax(s, -1), rtol=0, atol=1e-6)

    def test_fused_ffn_equals_two_matrices(self):
        for norm in ("none", "weight", "spectral"):
            m = perturb(GPT2LM(tiny(ffn_norm=norm), seed=5)).eval()
            x = torch.randn(3, 7, 48)
            for block in m.h:
                if norm == "spectral":
                    sigma = torch.linalg.matrix_norm(block.mlp.c_fc.weight.detach(), 2).item()
                    self.assertAlmostEqual(sigma, 1.0, places=3)
                w, b = block.mlp.fused()
                with torch.no_grad():
                    torch.testing.assert_close((x.double() @ w + b).float(), block.mlp(x), rtol=1e-5, atol=1e-5,
                                               msg=f"ffn_norm {norm}")

    def test_baseline_ffn_is_not_linear(self):
        m = GPT2LM(tiny("baseline", init_std=1.0), seed=5).eval()
        x = torch.randn(5, 48)
        with torch.no_grad():
            mlp = m.h[0].mlp
            self.assertGreater((mlp(2 * x) - 2 * mlp(x) + mlp(torch.zeros(1, 48))).abs().max().item(), 1e-2)
        with self.assertRaises(ValueError):
            mlp.fused()

    def test_entropy_equals_direct_computation(self):
        m = perturb(GPT2LM(tiny(temperature=True), seed=6)).eval()
        ent = attention_entropy(m, self.ids)
        self.assertEqual(tuple(ent.shape), (3, 4))
        with torch.no_grad():
            _, probs = m(self.ids, need="probs")
        direct = torch.stack([-(p.double() * torch.where(p > 0, p.double().log(), torch.zeros_like(p.double())))
                              .sum(-1).mean(dim=(0, 2)) for p in probs])
        torch.testing.assert_close(ent, direct, rtol=0, atol=1e-6)
        # The first query row sees one key: entropy 0; the map is bounded by log(rows).
        _, rows = m(self.ids, need="entropy")
        self.assertLess(rows[0][:, :, 0].abs().max().item(), 1e-6)
        self.assertTrue(bool((ent > 0).all()) and bool((ent < math.log(29)).all()))

    def test_entropy_path_equals_fast_path(self):
        m = perturb(GPT2LM(tiny(temperature=True), seed=7)).eval()
        logits, _ = m(self.ids, need="entropy")
        torch.testing.assert_close(logits, m(self.ids), rtol=0, atol=1e-5)

    def test_regulariser(self):
        L, B, H, T, ctx, gamma = 2, 3, 4, 5, 64, 0.2
        lim = gamma * math.log(ctx)
        theta = torch.rand(L, H) * 0.5 + 0.2
        target = theta[:, None, :, None] * math.log(ctx)
        inside = target + (torch.rand(L, B, H, T) * 2 - 1) * lim * 0.99
        for reduce in ("rows", "mean"):
            self.assertEqual(entropy_penalty(inside, theta, ctx, gamma, reduce).item(), 0.0)
        # One row beyond the margin: its δ² summed over rows, averaged over the L·H heads.
        out = inside.clone()
        out[1, 2, 3, 4] = target[1, 0, 3, 0] + 1.5 * lim
        got = entropy_penalty(out, theta, ctx, gamma, "rows").item()
        self.assertAlmostEqual(got, (1.5 * lim) ** 2 / (L * H), places=5)
        # mean reduction: δ of the head's mean entropy.
        far = target.expand(L, B, H, T) + 0.0
        far = far.clone()
        far[0, :, 1, :] += 2 * lim
        self.assertAlmostEqual(entropy_penalty(far, theta, ctx, gamma, "mean").item(), (2 * lim) ** 2 / (L * H),
                               places=4)
        # The model's loss is λ times it, and θ receives a gradient.
        m = GPT2LM(tiny(temperature=True, entropy_reg=True, entropy_lambda=1e-3), seed=8)
        _, rows = m(self.ids, need="entropy")
        loss = m.entropy_loss(rows)
        loss.backward()
        self.assertGreater(loss.item(), 0)
        self.assertGreater(m.reg_theta.grad.abs().sum().item(), 0)
        self.assertGreater(m.h[0].attn.temperature.grad.abs().sum().item(), 0)

    def test_export_roundtrip(self):
        for kw in (dict(variant="baseline"), dict(), dict(temperature=True), dict(ffn_norm="spectral")):
            m = perturb(GPT2LM(tiny(**kw), seed=9)).eval()
            with tempfile.TemporaryDirectory() as d:
                export_gpt2(m, None, d)
                with open(os.path.join(d, "config.json")) as f:
                    c = json.load(f)
                from safetensors.torch import load_file
                names = set(load_file(os.path.join(d, "model.safetensors")))
                back = load_exported_gpt2(d)
            if m.cfg.variant == "lnfree":
                self.assertEqual(c["model_type"], "gpt2_lnfree")
                self.assertFalse(any(".ln_" in n or "ln_f" in n for n in names))
                self.assertIn("transformer.h.2.mlp.c_fused.weight", names)
                self.assertEqual("transformer.h.0.attn.temperature" in names, m.cfg.temperature)
                self.assertTrue(back.cfg.ffn_fused)
            torch.testing.assert_close(back(self.ids), m(self.ids), rtol=0, atol=1e-4, msg=str(kw))

    def test_decode_equals_forward(self):
        for kw in (dict(variant="baseline"), dict(temperature=True)):
            m = perturb(GPT2LM(tiny(**kw), seed=10)).eval()
            ids = self.ids[:1]
            full = m(ids)
            caches = m.new_caches()
            steps = [m(ids[:, :9], caches=caches)]
            for t in range(9, ids.shape[1]):
                steps.append(m(ids[:, t:t + 1], caches=caches))
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5, msg=str(kw))

    def test_committed_golden_is_the_reference(self):
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "golden", "lnfree")
        if not os.path.exists(os.path.join(root, "golden.json")):
            self.skipTest("tests/golden/lnfree not present")
        with open(os.path.join(root, "golden.json")) as f:
            golden = json.load(f)
        m = load_exported_gpt2(os.path.join(root, "hf"))
        self.assertTrue(m.cfg.temperature)
        for p in golden["prompts"]:
            ids = torch.tensor([p["token_ids"]])
            torch.testing.assert_close(m(ids)[0, -1], torch.tensor(p["last_logits"]), rtol=0, atol=1e-4)
            torch.testing.assert_close(attention_entropy(m, ids).float(), torch.tensor(p["entropy"]), rtol=0,
                                       atol=1e-5)
            self.assertGreater(p["no_temperature_max_abs_diff"], 0.1)
        for g in golden["greedy"]:
            self.assertEqual(m.generate(torch.tensor([g["prompt_ids"]]), len(g["generated_ids"])),
                             g["generated_ids"])

    def test_trainer_and_exporter(self):
        # Two steps of `starref.train --arch gpt2` per LN-free variant on a small synthetic corpus, then
        # `starref.export`: the run's log carries the entropy map and the export reloads to the trained model.
        import numpy as np

        from starref import export as export_mod
        from starref import train as train_mod
        with tempfile.TemporaryDirectory() as d:
            rng = np.random.default_rng(0)
            for name, n in (("train", 4000), ("val", 400)):
                rng.integers(0, 97, n).astype(np.uint16).tofile(os.path.join(d, f"{name}.bin"))
            with open(os.path.join(d, "manifest.json"), "w") as f:
                json.dump({"vocab_size": 97, "splits": {}, "packages": {}}, f)
            for variant in ("lnfree", "lnfree_ent"):
                run = os.path.join(d, variant)
                train_mod.main(["--arch", "gpt2", "--variant", variant, "--data", d, "--out", run, "--layers", "2",
                                "--width", "32", "--heads", "2", "--seq", "16", "--batch", "2", "--steps", "2",
                                "--eval-windows", "2", "--entropy-windows", "2", "--device", "cpu"])
                with open(os.path.join(run, "final.json")) as f:
                    final = json.load(f)
                self.assertEqual(len(final["entropy"]), 2)
                self.assertEqual(len(final["entropy"][0]), 2)
                self.assertFalse(final["diverged"])
                self.assertEqual("theta" in final, variant == "lnfree_ent")
                export_mod.main(["--run", run, "--out", os.path.join(d, "x-" + variant)])
                model, _ = export_mod.load_run(run)
                back = load_exported_gpt2(os.path.join(d, "x-" + variant))
                ids = torch.randint(0, 97, (1, 16))
                torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-4)

    def test_positions_beyond_context_refused(self):
        m = GPT2LM(tiny(), seed=1)
        with self.assertRaises(ValueError):
            m(torch.zeros(1, 41, dtype=torch.long))


if __name__ == "__main__":
    unittest.main()
