"""Greedy agreement between batched generation and one-prompt-at-a-time `model.generate`.

    python tools/agreement.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quantization nf4|none]
                              [--weights nf4|dequantized] [--merge]

Runs the exactness test's 40 prompts on the tiny komt model (NF4 + LoRA by default) and prints how
many rows give the same trimmed response batched (sorted, left-padded, batch size 8) as alone. In
float32 this must be 40/40 (tests/test_exactness.py); with bfloat16 compute a few near-tied rows may
legitimately differ, because rounding depends on the batch's shape. `--weights dequantized` runs the
NF4 layers dequantized once (model.weights), the way a GPU with room runs them; `--merge` merges
the adapter into them (model.merge_adapter) and also counts the rows whose answer alone equals the
unmerged adapter's.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.config import GenerationSettings, ModelConfig  # noqa: E402
from batch.engine import Engine  # noqa: E402
from batch.loading import load_model  # noqa: E402
from batch.plan import plan_batches  # noqa: E402
from tests.test_exactness import MAX_NEW, prompts_40  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--weights", default="nf4", choices=["nf4", "dequantized"])
    p.add_argument("--merge", action="store_true")
    args = p.parse_args()
    engine = Engine(*load_model(config(args, args.merge)), GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False))
    ids = engine.tokenize(prompts_40())
    alone = one_at_a_time(engine, ids)
    together = [None] * len(ids)
    for batch in plan_batches([len(i) for i in ids], MAX_NEW, 8, 10**6):  # sorted, left-padded batches of 8
        for row, c in zip(batch, engine.generate([ids[r] for r in batch], [0] * len(batch))):
            together[row] = (c.response, c.finish_reason)
    same = sum(a == b for a, b in zip(alone, together))
    weights = f" ({args.weights}{', adapter merged' if args.merge else ''})" if args.quantization == "nf4" else ""
    print(f"agreement {args.quantization}{weights} {args.dtype} on {args.device}: {same}/{len(ids)} rows equal batched vs alone")
    if args.merge:
        del engine
        unmerged = Engine(*load_model(config(args, False)), GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False))
        same = sum(a == b for a, b in zip(alone, one_at_a_time(unmerged, ids)))
        print(f"agreement merged vs unmerged adapter, {args.dtype} on {args.device}: {same}/{len(ids)} rows equal (alone)")


def config(args, merge: bool) -> ModelConfig:
    return ModelConfig(
        base=str(ROOT / "models/tiny-komt/base"),
        adapter=str(ROOT / "models/tiny-komt/adapter"),
        quantization=args.quantization,
        compute_dtype=args.dtype,
        device_map=args.device,
        weights="dequantized" if merge else args.weights,
        merge_adapter=merge,
    )


def one_at_a_time(engine: Engine, ids: list[list[int]]) -> list[tuple[str, str]]:
    out = []
    for p_ids in ids:
        tokens = engine.model.generate(torch.tensor([p_ids], device=engine.device), max_new_tokens=MAX_NEW, do_sample=False)
        c = engine.finish(list(p_ids), tokens[0, len(p_ids):].tolist())
        out.append((c.response, c.finish_reason))
    return out


if __name__ == "__main__":
    main()
