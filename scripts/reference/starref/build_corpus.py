"""Build the training corpus and its tokenizer (see starref.data).

  python -m starref.build_corpus --out corpus --vocab 8192
"""
import argparse
import json

from .data import build_corpus


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    print(json.dumps(build_corpus(args.out, args.vocab), indent=1))


if __name__ == "__main__":
    main()
