"""What does discovering a model's layout cost, relative to one forward pass of the same four tokens?

Discovery (``ipg_lightning.model.discovery.discover_layout``) runs one four-token probe pass with hooks on
the first block's projections and norms, once per model; later calls read a cache. The baseline is a
plain four-token forward of the same model in the same process.

    python benchmarks/discovery_cost.py --model smollm2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ipg_lightning.model.discovery import _cache, discover_layout
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH


def main() -> None:
    """Time a fresh discovery, a cached one and a plain forward; print medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_REASONER_PATH)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, _ = load_model_and_tokenizer(args.model)
    ids = torch.tensor([[1, 2, 3, 4]])
    fresh, cached, forward = [], [], []
    for _ in range(args.repeats):
        _cache.pop(model, None)
        start = time.perf_counter()
        layout = discover_layout(model)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        discover_layout(model)
        cached.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            model(ids)
        forward.append(time.perf_counter() - start)
    median = statistics.median
    print(f"model {args.model}: {layout}")
    print(
        f"discovery {median(fresh) * 1e3:.1f} ms (median of {args.repeats}), cached {median(cached) * 1e6:.1f} us, "
        f"plain 4-token forward {median(forward) * 1e3:.1f} ms, ratio {median(fresh) / median(forward):.2f}x"
    )


if __name__ == "__main__":
    main()
