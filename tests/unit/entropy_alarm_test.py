#!/usr/bin/env python3
"""evals/entropy_alarm.py on a hand-made star_accuracy file: the pairing, the kept/lost counts, the bins and the rule."""
import io
import json
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "evals"))
import entropy_alarm  # noqa: E402


def row(task, sample, config, correct, entropy):
    return dict(eval="star_accuracy", task=task, target_tokens=1024, context_tokens=1030, config=config,
                sample=sample, correct=correct, answers=["1"], output="", entropy_mean=entropy)


class EntropyAlarm(unittest.TestCase):
    def run_on(self, rows, *extra):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps(dict(eval="other", task="x")) + "\n")
            path = f.name
        try:
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                entropy_alarm.main([path, *extra])
            return [json.loads(l) for l in out.getvalue().splitlines()], err.getvalue()
        finally:
            os.unlink(path)

    def test_pairs_counts_bins_and_rule(self):
        rows = [
            row("passkey", 0, "global", True, 2.0), row("passkey", 0, "star-1/4", True, 2.03),
            row("passkey", 0, "star-1/8", False, 2.5), row("passkey", 0, "exact", True, 2.0),
            row("passkey", 1, "global", True, 2.1), row("passkey", 1, "star-1/4", False, 2.25),
            row("passkey", 1, "star-1/8", True, 2.16), row("passkey", 1, "exact", True, 2.1),
            # global wrong: star right counts as gained, never in the kept share
            row("passkey", 2, "global", False, 2.2), row("passkey", 2, "star-1/4", True, 2.21),
            # no global run for this sample: not paired
            row("niah-single", 0, "star-1/4", False, 3.0),
        ]
        out, md = self.run_on(rows, "--pairs")
        pairs = [r for r in out if r["kind"] == "pair"]
        self.assertEqual(len(pairs), 7)
        cfg = {r["config"]: r for r in out if r["kind"] == "config"}
        self.assertEqual((cfg["star-1/4"]["kept"], cfg["star-1/4"]["global_correct"], cfg["star-1/4"]["gained"]),
                         (1, 2, 1))
        self.assertAlmostEqual(cfg["star-1/4"]["mean_delta_kept"], 0.03)
        self.assertAlmostEqual(cfg["star-1/4"]["mean_delta_lost"], 0.15)
        self.assertAlmostEqual(cfg["star-1/8"]["max_delta"], 0.5)
        self.assertEqual((cfg["exact"]["kept"], cfg["exact"]["mean_delta"]), (2, 0.0))
        bins = [r for r in out if r["kind"] == "bin"]
        # star only: deltas 0.03 (kept), 0.15 (lost), 0.01 (global wrong), 0.5 (lost), 0.06 (kept)
        self.assertEqual([(b["pairs"], b["kept"], b["global_correct"]) for b in bins],
                         [(2, 1, 1), (1, 1, 1), (1, 0, 1), (0, 0, 0), (1, 0, 1)])
        rule = {t["tau"]: t for t in out[-1]["thresholds"]}
        self.assertEqual((rule[0.1]["below_kept"], rule[0.1]["below_global_correct"]), (2, 2))
        self.assertEqual((rule[0.1]["above_kept"], rule[0.1]["above_global_correct"]), (0, 2))
        self.assertIn("| star-1/4 | 3 |", md)

    def test_no_pairs_is_a_clear_error(self):
        with self.assertRaises(SystemExit) as e:
            self.run_on([row("passkey", 0, "star-1/4", True, 2.0)])
        self.assertIn("no sample has both a global run", str(e.exception.code))


if __name__ == "__main__":
    unittest.main()
