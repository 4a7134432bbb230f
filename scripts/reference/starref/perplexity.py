"""The reference's validation perplexity of an exported model (float32, CPU), global or Star Attention, over the
windows evals/perplexity.py sends to starserve: window i = ids[i*seq : i*seq + seq + 1], tokens 1..seq scored.
Under star the window is split as starserve splits a plain prompt (star/partition.h split_plain_prompt: the last
min(32, max(1, n / 4)) tokens are the query), the context encoded in blocks with the anchor (starref/star.py).

  python -m starref.perplexity --model models/kvshift-6l --val-bin corpus/val.bin [--star-block 128 --anchor 128]

Attamba models (model_type "attamba") run the same way: global is the dense oracle; under star the block must be a
multiple of the chunk size, and --exact gives the exact context-parallel mode (equal to global).
"""
import argparse
import json
import math

import torch

from .data import TokenFile
from .golden import full_logits, load_exported
from .star import star_encode, star_query, token_logprobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--val-bin", required=True)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=1_000_000)
    ap.add_argument("--star-block", type=int, default=0, help="0 = global attention")
    ap.add_argument("--anchor", type=int, default=0, help="anchor size (default: the block size)")
    ap.add_argument("--exact", action="store_true", help="attamba: exact mode (every block sees all earlier context)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_exported(args.model)
    ids = TokenFile(args.val_bin).ids
    n = min(args.windows, (len(ids) - 1) // args.seq)
    total, count = 0.0, 0
    for i in range(n):
        w = [int(t) for t in ids[i * args.seq:i * args.seq + args.seq + 1]]
        if args.star_block:
            n_ctx = len(w) - min(32, max(1, len(w) // 4))
            enc = star_encode(model, w[:n_ctx], args.star_block, args.anchor or args.star_block, args.exact)
            q, _, _ = star_query(model, enc, w[n_ctx:])
            logits = torch.cat([enc["logits"], q])
        else:
            logits = full_logits(model, w)
        lp = token_logprobs(logits, w)
        total -= sum(lp)
        count += len(lp)
    mode = f"star block {args.star_block} anchor {args.anchor or args.star_block}" if args.star_block else "global"
    if args.star_block and args.exact:
        mode = f"exact block {args.star_block}"
    print(json.dumps(dict(model=args.model, mode=mode, windows=n, tokens=count, loss=total / count,
                          ppl=math.exp(total / count))))


if __name__ == "__main__":
    main()
