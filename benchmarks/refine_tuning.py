"""Block refinement's step count and learning rate, measured on held-out data one block at a time.

For chosen blocks of a compressed artifact, the dense model and the artifact run side by side up to the
block (on the calibration windows and on held-out C4 validation windows); the artifact's block is then
refined towards the dense block's outputs exactly as ``rankcut compress --refine-steps`` does
(:func:`rankcut.refine.refine_block`), for each (steps, lr) of the grid, and its normalized output error
is measured on the held-out windows. A whole compress-and-evaluate cell costs 20-80 minutes on SmolLM2
here; this measures the lever itself in minutes, on data that did not train it.

    python benchmarks/refine_tuning.py ~/.cache/rankcut/bench/artifacts/cli-zerosum-pivga-keep0.8 \
        --blocks 4 20 --out benchmarks/results/smollm2/refine-tuning-zerosum-keep0.8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import rankcut
from rankcut.calibration import BlockStream, block_output
from rankcut.layers import describe_layer
from rankcut.refine import block_error, refine_block
from rankcut.targets import find_targets


def propagate(blocks, hidden: list[torch.Tensor], kwargs: dict[int, list[dict]], upto: int) -> list[torch.Tensor]:
    """The inputs of block ``upto``, from those of block 0 (one tensor per batch)."""
    with torch.no_grad():
        for index in range(upto):
            hidden = [block_output(blocks[index](h, **kw)) for h, kw in zip(hidden, kwargs[index])]
    return hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 20])
    parser.add_argument("--steps", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=32, help="C4 validation windows to measure on")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer = rankcut.load_model(args.model)
    compressed, _ = rankcut.load(args.artifact)
    calibration = rankcut.sample_calibration(tokenizer, rankcut.load_text("wikitext2", "validation"),
                                             args.nsamples, args.seqlen, seed=0)
    held_out = rankcut.sample_calibration(tokenizer, rankcut.load_text("c4", "validation"),
                                          args.held_out, args.seqlen, seed=1)
    record = {"artifact": args.artifact.name, "model": args.model, "nsamples": args.nsamples,
              "held_out_c4_windows": args.held_out, "seqlen": args.seqlen, "batch_size": args.batch_size,
              "blocks": {}}
    if args.out.exists():  # resume: the runs already recorded are not made again
        record["blocks"] = json.loads(args.out.read_text())["blocks"]
    # block 0's inputs (the embeddings, which are not factorized) and every block's keyword arguments
    streams = [BlockStream(dense, find_targets(dense), windows, args.batch_size) for windows in (calibration, held_out)]
    (h_train, kw_train), (h_test, kw_test) = (stream.capture() for stream in streams)
    dense_blocks, compressed_blocks = streams[0].blocks, compressed.get_submodule(streams[0].prefix)
    for index in args.blocks:
        done = {(run["steps"], run["lr"]) for run in record["blocks"].get(str(index), {}).get("runs", [])}
        if all((steps, lr) in done for steps in args.steps for lr in args.lrs):
            continue
        original = compressed_blocks[index]
        with torch.no_grad():
            y_train, y_test = ([block_output(dense_blocks[index](x, **kw)) for x, kw in zip(
                propagate(dense_blocks, h, kwargs, index), kwargs[index])]
                for h, kwargs in ((h_train, kw_train), (h_test, kw_test)))
        xt_train = propagate(compressed_blocks, h_train, kw_train, index)
        xt_test = propagate(compressed_blocks, h_test, kw_test, index)
        runs = record["blocks"].get(str(index), {}).get("runs", [])
        entry = {"held_out_error_before": block_error(original, xt_test, y_test, kw_test[index]),
                 "train_error_before": block_error(original, xt_train, y_train, kw_train[index]), "runs": runs}
        print(f"block {index} before refinement: train {entry['train_error_before']:.5f}, held-out "
              f"{entry['held_out_error_before']:.5f}", flush=True)
        for steps in args.steps:
            for lr in args.lrs:
                if (steps, lr) in done:
                    continue
                block = copy.deepcopy(original)
                modules = [m for m in block.modules() if describe_layer(m) is not None]
                start = time.perf_counter()
                report = refine_block(block, modules, xt_train, y_train, kw_train[index], steps=steps, lr=lr, seed=index)
                seconds = time.perf_counter() - start
                run = {"steps": steps, "lr": lr, "train_error_after": report["error_after"], "kept": report["kept"],
                       "held_out_error_after": block_error(block, xt_test, y_test, kw_test[index]), "seconds": seconds}
                runs.append(run)
                record["blocks"][str(index)] = entry
                args.out.write_text(json.dumps(record, indent=1) + "\n")  # after every run: a long grid resumes nothing, loses little
                print(f"block {index} steps {steps} lr {lr:g}: train {report['error_after']:.5f}, held-out "
                      f"{run['held_out_error_after']:.5f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
