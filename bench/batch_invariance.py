"""How much does batching change a request's greedy output? Left-padded batch vs each prompt alone.

    python bench/batch_invariance.py device=cpu                                   # tiny_qwen2, fp32
    python bench/batch_invariance.py device=cpu adapters=RUN/checkpoint-30

Loads the model exactly as the serve stage does (:func:`npu_recipes.infer.loading.load`), greedily
generates ``--new-tokens`` tokens for ``--prompts`` chat prompts of different lengths, once as
one left-padded batch (as the server batches them) and once one prompt at a time, and reports:
the largest absolute difference between a row's logits in the batch and alone (over all steps
while both still agree on the tokens; a row's scores end where it produced its end-of-turn token
alone), how many prompts got identical greedy tokens, and the
smallest gap between the two largest logits (a gap below the logit difference could flip a greedy
choice). JSON goes to bench/results/ with the device and package versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# As npu_recipes/__init__.py does: an installed torch_npu must not load (and fail) inside `import torch`.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import results_io  # bench/ is on sys.path when a script in it runs
import torch

from npu_recipes.config import compose
from npu_recipes.data import demo
from npu_recipes.infer import adapters, loading
from npu_recipes.run import manifest
from npu_recipes.runtime import devices


def greedy(model, tokenizer, texts, new_tokens, device):
    """Greedy generation of a left-padded batch; returns (tokens (batch, steps), scores (steps, batch, vocab)).

    ``steps`` <= ``new_tokens``: generation ends when every row has produced an end-of-turn token.
    """
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:].cpu(), torch.stack(out.scores).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="npu_recipes overrides (model=..., adapters=..., device=...)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--adapter", help="adapter name to activate (default: the first; 'base' disables adapters)")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--note", default="", help="how the model or adapter was made, kept in the JSON")
    args = parser.parse_args()

    config = compose.compose(args.overrides)
    device = devices.resolve(config.device)
    parsed = adapters.parse_adapters(config.adapters)
    loaded = loading.load(adapters.base_model_config(config.model, parsed), parsed, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = demo.generate(args.prompts, seed=5)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": " ".join([row["input"]] * (1 + i % 3))}],
                                           tokenize=False, add_generation_prompt=True) for i, row in enumerate(rows)]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    target = device.torch_device()
    context = model.disable_adapter() if loaded.adapters and args.adapter == "base" else torch.no_grad()
    if loaded.adapters and args.adapter not in (None, "base"):
        model.set_adapter(args.adapter)
    with context:
        batch_tokens, batch_scores = greedy(model, tokenizer, texts, args.new_tokens, target)
        alone = [greedy(model, tokenizer, [text], args.new_tokens, target) for text in texts]
    max_diff, same, min_gap = 0.0, 0, float("inf")
    for row, (tokens, scores) in enumerate(alone):
        length = tokens.shape[1]
        agree = int((tokens[0] == batch_tokens[row, :length]).cumprod(0).sum())
        same += agree == length
        steps = max(agree, 1)
        solo, batched = scores[:steps, 0], batch_scores[:steps, row]
        finite = torch.isfinite(solo) & torch.isfinite(batched)
        assert torch.equal(finite, torch.isfinite(solo)), "masked logits differ between batch and alone"
        max_diff = max(max_diff, float((solo - batched).abs()[finite].max()))
        top2 = scores[:, 0].topk(2, dim=-1).values
        min_gap = min(min_gap, float((top2[:, 0] - top2[:, 1]).min()))
    record = {
        "device": device.name(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "versions": manifest.package_versions(),
        "settings": {"overrides": args.overrides, "adapter": args.adapter or (loaded.adapters[0].name if loaded.adapters else None),
                     "note": args.note, "prompts": args.prompts, "new_tokens": args.new_tokens,
                     "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths)},
        "results": {"identical_greedy_outputs": same, "max_abs_logit_difference": max_diff,
                    "min_top1_top2_logit_gap": min_gap},
    }
    results_io.write(record, "batch_invariance", device.name(), args.tag)


if __name__ == "__main__":
    main()
