"""Per-token cost of grammar-constrained decoding: xgrammar, llguidance and outlines-core side by side.

    python bench/grammar_overhead.py [--tokenizer DIR] [--steps 300]

For each library that imports: the time to compile a JSON schema (and the built-in "any JSON
object" grammar where the library has one) for the tokenizer, then the mean time per decoding step
of filling the allowed-token mask, applying it to a (1, vocab) float32 logits row and advancing the
matcher with a token drawn at random among the allowed ones (seeded; a draw that completes the
grammar restarts it). That is the overhead the server adds per generated token of a
``response_format`` request, on top of the model's forward pass. Default tokenizer: tiny_qwen2's
(716 tokens) built locally; pass ``--tokenizer`` for a real one (the cost of mask filling grows
with the vocabulary). JSON goes to bench/results/ with the device and package versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import results_io  # bench/ is on sys.path when a script in it runs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema):
        grammar = self.compiler.compile_builtin_json_grammar() if schema is None else \
            self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return lambda: self.xgr.GrammarMatcher(grammar)

    def allowed(self, matcher, logits):
        matcher.fill_next_token_bitmask(self.mask)
        self.xgr.apply_token_bitmask_inplace(logits, self.mask)

    def accept(self, matcher, token):
        matcher.accept_token(token)
        return matcher.is_terminated()


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lltorch

        self.ll, self.lltorch = llguidance, lltorch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.mask = lltorch.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema, defaults={"whitespace_flexible": False})
        return lambda: self.ll.LLMatcher(self.tokenizer, grammar)

    def allowed(self, matcher, logits):
        self.lltorch.fill_next_token_bitmask(matcher, self.mask, 0)
        self.lltorch.apply_token_bitmask_inplace(logits, self.mask)

    def accept(self, matcher, token):
        matcher.consume_token(token)
        return matcher.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size):
        from outlines_core import Vocabulary

        self.vocab_size = vocab_size
        eos = tokenizer.eos_token_id
        tokens = {}
        for token_id in range(len(tokenizer)):
            if token_id == eos:
                continue
            text = tokenizer.convert_ids_to_tokens(token_id)
            tokens.setdefault(text, []).append(token_id)
        self.vocabulary = Vocabulary(eos, tokens)

    def compile(self, schema):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        if schema is None:
            return None
        index = Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)
        return lambda: Guide(index)

    def allowed(self, matcher, logits):
        allowed = torch.tensor(matcher.get_tokens(), dtype=torch.long)
        mask = torch.full_like(logits, float("-inf"))
        mask[:, allowed] = 0
        logits += mask

    def accept(self, matcher, token):
        matcher.advance(token)
        return matcher.is_finished()


def measure(backend, factory, steps, vocab_size, seed=0):
    rng = random.Random(seed)
    matcher = factory()
    total, restarts = 0.0, 0
    for _ in range(steps):
        logits = torch.zeros(1, vocab_size)
        start = time.perf_counter()
        backend.allowed(matcher, logits)
        allowed = torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()
        token = rng.choice(allowed)
        finished = backend.accept(matcher, token)
        total += time.perf_counter() - start
        if finished:
            matcher, restarts = factory(), restarts + 1
    return total / steps, restarts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: tiny_qwen2's, built locally)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer:
        path = args.tokenizer
    else:
        from npu_recipes.config.schema import ModelConfig
        from npu_recipes.model import pretrained
        from npu_recipes.paths import cache_dir

        path = pretrained.resolve_path(ModelConfig(name_or_path=str(cache_dir() / "tiny_qwen2-v1"), builder="tiny_qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab_size = len(tokenizer)
    results = {}
    for cls in (Xgrammar, Llguidance, OutlinesCore):
        try:
            backend = cls(tokenizer, vocab_size)
        except ImportError as error:
            results[cls.name] = {"skipped": str(error)}
            continue
        row = {"version": metadata.version(cls.name)}
        for label, schema in (("json_schema", SCHEMA), ("json_object", None)):
            start = time.perf_counter()
            factory = backend.compile(schema)
            if factory is None:
                row[label] = "no built-in grammar"
                continue
            compile_s = time.perf_counter() - start
            per_token, restarts = measure(backend, factory, args.steps, vocab_size)
            row[label] = {"compile_ms": round(compile_s * 1000, 2), "per_token_us": round(per_token * 1e6, 1),
                          "completed_documents": restarts}
        results[cls.name] = row
    record = {
        "device": f"cpu {platform.machine()}",
        "tokenizer": str(path), "vocab_size": vocab_size, "steps": args.steps,
        "versions": {name: metadata.version(name) for name in ("torch", "transformers")},
        "results": results,
    }
    results_io.write(record, "grammar_overhead", f"cpu {platform.machine()}")


if __name__ == "__main__":
    main()
