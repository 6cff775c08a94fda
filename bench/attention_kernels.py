"""Attention over a packed row: one call per sample against one varlen call per layer, side by side.

    python bench/attention_kernels.py                       # Qwen2-7B shapes (28 heads, 4 K/V heads, dim 128)
    python bench/attention_kernels.py --quick               # small shapes, for a CPU check that it runs

One packed row of ``--tokens`` tokens holds samples of about ``--sample-tokens`` tokens each (lengths
drawn from a seeded exponential around that mean, as chat SFT data is skewed). Each side takes the
same ``query [1, heads, tokens, head_dim]`` and ``key/value [1, kv_heads, tokens, head_dim]`` and
returns ``[1, tokens, heads, head_dim]``; forward plus backward is timed ``--repeats`` times after
``--warmup`` untimed calls, with the device synchronised around each call. Sides:

* ``sdpa_by_sample``: npu_recipes' SDPA path, one causal SDPA call per sample (``torch.split``);
* ``sdpa_sliced``: the same with slicing (what transformers' per-sample loop did), for the backward's allocations;
* ``torch_varlen``: PyTorch's ``varlen_attn`` (torch >= 2.10) through npu_recipes' adapter, one call per row;
* ``flex_attention``: ``torch.nn.attention.flex_attention`` with a block-diagonal causal block mask, compiled.

A side the device or torch lacks is recorded as skipped with the reason. Every side's output and
input gradients are compared with ``sdpa_by_sample`` (largest absolute difference). JSON goes to
bench/results/ with the device and package versions.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # as npu_recipes/__init__.py does

import results_io  # bench/ is on sys.path when a script in it runs
import torch

from npu_recipes.model import attention
from npu_recipes.run import manifest
from npu_recipes.runtime import devices


def sample_lengths(tokens: int, mean: int, seed: int) -> list[int]:
    """Lengths of at least 8 tokens, exponential around ``mean``, filling exactly ``tokens``."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(max(8, int(rng.expovariate(1 / mean))))
    lengths[-1] -= sum(lengths) - tokens
    if lengths[-1] < 8:
        lengths[-2] += lengths.pop()
    return lengths


def sliced_sdpa(module, query, key, value, cu_seq_lens):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None)[0]
               for a, b in zip(cu_seq_lens, cu_seq_lens[1:])]
    return torch.cat(outputs, dim=1)


def flex_side(lengths: list[int], device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

    def causal_within_sample(batch, head, q_index, kv_index):
        return (document[q_index] == document[kv_index]) & (q_index >= kv_index)

    total = sum(lengths)
    mask = create_block_mask(causal_within_sample, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention)

    def run(module, query, key, value, cu_seq_lens):
        return compiled(query, key, value, block_mask=mask, enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)

    return run


def sides(lengths: list[int], device: torch.device) -> dict:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    found: dict = {
        "sdpa_by_sample": lambda m, q, k, v, c: attention.sdpa_by_sample(m, q, k, v, None, cu_seq_lens_q=c)[0],
        "sdpa_sliced": sliced_sdpa,
    }
    varlen = attention.torch_varlen()
    if varlen is None:
        found["torch_varlen"] = "torch.nn.attention.varlen.varlen_attn is missing (torch < 2.10)"
    else:
        function = attention.make_varlen_attention(varlen)
        cu_device = torch.tensor(cu, dtype=torch.int32, device=device)
        found["torch_varlen"] = lambda m, q, k, v, c: function(m, q, k, v, None, cu_seq_lens_q=cu_device, cu_seq_lens_k=cu_device,
                                                               max_length_q=max(lengths), max_length_k=max(lengths))[0]
    try:
        found["flex_attention"] = flex_side(lengths, device)
    except Exception as error:  # any failure to build the mask is this side's result, not the benchmark's
        found["flex_attention"] = f"{type(error).__name__}: {error}"
    return found, cu


def measure(run, module, inputs, cu, device: devices.Device, warmup: int, repeats: int) -> dict:
    def once():
        q, k, v = (tensor.detach().requires_grad_() for tensor in inputs)
        output = run(module, q, k, v, cu)
        output.float().square().mean().backward()
        return output.detach(), [t.grad for t in (q, k, v)]

    for _ in range(warmup):
        once()
    device.synchronize()
    device.reset_peak_memory()
    times = []
    for _ in range(repeats):
        device.synchronize()
        start = time.perf_counter()
        result = once()
        device.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_ms": round(1000 * times[len(times) // 2], 3), "min_ms": round(1000 * times[0], 3),
            "peak_memory_gib": device.peak_memory_gib()}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "npu"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sample-tokens", type=int, default=175)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="256 tokens, 4 heads, 2 K/V heads, dim 32, 3 repeats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.sample_tokens, args.heads, args.kv_heads, args.head_dim, args.repeats, args.warmup = 256, 40, 4, 2, 32, 3, 1

    device = devices.resolve(args.device)
    target = device.torch_device()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    lengths = sample_lengths(args.tokens, args.sample_tokens, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    shapes = [(1, args.heads, args.tokens, args.head_dim)] + [(1, args.kv_heads, args.tokens, args.head_dim)] * 2
    inputs = [torch.randn(shape, generator=generator).to(target, dtype) for shape in shapes]
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=args.heads // args.kv_heads, training=True)

    candidates, cu = sides(lengths, target)
    results, reference = {}, None
    for name, run in candidates.items():
        if isinstance(run, str):
            results[name] = {"skipped": run}
            continue
        try:
            timing, (output, grads) = measure(run, module, inputs, cu, device, args.warmup, args.repeats)
        except Exception as error:  # a kernel the device lacks is this side's result
            results[name] = {"skipped": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        if reference is None:
            reference = (output, grads)
        timing["max_abs_diff_output"] = float((output.float() - reference[0].float()).abs().max())
        timing["max_abs_diff_grads"] = max(float((g.float() - r.float()).abs().max()) for g, r in zip(grads, reference[1]))
        results[name] = timing
    base = results["sdpa_by_sample"].get("median_ms")
    for timing in results.values():
        if base and "median_ms" in timing:
            timing["speedup_over_sdpa_by_sample"] = round(base / timing["median_ms"], 3)
    varlen = attention.torch_varlen()
    record = {
        "device": device.name(),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": manifest.package_versions(),
        "settings": {"tokens": args.tokens, "samples": len(lengths), "mean_sample_tokens": round(args.tokens / len(lengths), 1),
                     "longest_sample": max(lengths), "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                     "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                     "varlen_signature": str(attention.varlen_call(varlen)) if varlen else None,
                     "attention_flops_ratio_row_over_samples": round(args.tokens ** 2 / sum(n * n for n in lengths), 2)},
        "results": results,
    }
    results_io.write(record, "attention_kernels", device.name(), "quick" if args.quick else "")
    if not math.isfinite(results["sdpa_by_sample"].get("median_ms", float("nan"))):
        sys.exit(1)


if __name__ == "__main__":
    main()
