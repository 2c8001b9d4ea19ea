"""Reload a saved artifact in a fresh process, measure its perplexity, then gauge-fix it to PivGa
in place and measure again: the reload must reproduce the in-process figure and the conversion
must leave perplexity unchanged (lossless up to float32 rounding).

    python benchmarks/verify_artifact.py ARTIFACT --out benchmarks/results/smollm2/verify-....json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import rankcut
from rankcut.data import load_text
from rankcut.layers import convert_to_pivga


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, help="windows for the reload check (default: all)")
    parser.add_argument("--convert-windows", type=int, help="windows for the conversion check (default: all)")
    args = parser.parse_args()
    model, tokenizer = rankcut.load(args.artifact, device="cpu")
    corpus = load_text(args.dataset, args.split)
    reloaded = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=args.seqlen, max_windows=args.max_windows)
    before = reloaded
    if args.convert_windows != args.max_windows:
        before = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=args.seqlen, max_windows=args.convert_windows)
    params_plain = sum(p.numel() for p in model.parameters())
    convert_to_pivga(model)
    converted = rankcut.evaluate_perplexity(model, tokenizer, corpus, seqlen=args.seqlen, max_windows=args.convert_windows)
    result = {
        "artifact": args.artifact.name,  # the folder name: where it lives is machine-specific
        "reloaded": reloaded.to_dict(),
        "plain_before_conversion": before.to_dict(),
        "converted_to_pivga": converted.to_dict(),
        "params_plain": params_plain,
        "params_pivga": sum(p.numel() for p in model.parameters()),
        "relative_change": converted.perplexity / before.perplexity - 1,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    print(f"reloaded ppl {reloaded.perplexity:.4f} ({reloaded.windows} windows); plain {before.perplexity:.4f} -> "
          f"PivGa {converted.perplexity:.4f} ({converted.windows} windows)")


if __name__ == "__main__":
    main()
