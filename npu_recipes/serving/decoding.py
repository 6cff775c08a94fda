"""Choosing each row's next token by its own settings, so requests with any mix of settings share a batch.

transformers ``generate`` applies one set of logits processors and one sampling mode to a whole
batch. The server instead gives ``generate`` a single :class:`RowsProcessor` as its logits
processor and decodes greedily (``do_sample=False``): for every row the processor applies that
row's own transformers processors to its raw logits (``SequenceBiasLogitsProcessor`` for
``logit_bias``, ``MinNewTokensLengthLogitsProcessor`` for ``min_tokens``,
``RepetitionPenaltyLogitsProcessor``, the grammar mask, then ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``), picks the token (arg max, or a
draw from the row's own ``torch.Generator``), records its log-probability, and returns scores that
are ``-inf`` everywhere but at the chosen token, so ``generate``'s arg max takes exactly that token.

Consequences: a row's tokens depend only on its own prompt, settings and seed, never on which
other requests share its batch (up to float rounding of the batched forward pass); greedy and
sampled, seeded and unseeded requests batch together. Log-probabilities are of the model's raw
distribution (log-softmax of the logits before any processor), as vLLM reports them by default.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

log = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5
"""A temperature below this is greedy decoding (vLLM's ``_SAMPLING_EPS``): dividing logits by a
near-zero temperature overflows them to inf, and softmax of inf is NaN, not an arg max."""


@dataclass(frozen=True)
class Decoding:
    """One choice's decoding settings, with the model's ``generation_config`` defaults already applied.

    ``do_sample`` False is greedy decoding (the sampling warpers are not applied). ``seed`` seeds
    the row's own generator (None: a random seed). Penalties: OpenAI's ``presence_penalty`` and
    ``frequency_penalty`` over the completion's tokens; ``repetition_penalty`` as transformers
    applies it over prompt and completion. ``logit_bias`` maps token ids to additive biases.
    ``min_tokens`` suppresses the end-of-turn tokens until that many tokens were generated.
    ``top_logprobs`` None: no log-probabilities; N >= 0: the chosen token's and the N most likely.
    """

    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    min_tokens: int = 0
    top_logprobs: Optional[int] = None

    @classmethod
    def resolve(cls, model_defaults, *, temperature: Optional[float], top_p: Optional[float], top_k: Optional[int],
                **settings) -> "Decoding":
        """Settings for a request, OpenAI's way: ``temperature`` 0 (below :data:`SAMPLING_EPS`) is
        greedy, any other given ``temperature``/``top_p``/``top_k`` samples; what the request leaves
        unset comes from ``model_defaults`` (the model's ``GenerationConfig``: ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``), as vLLM does."""
        if settings.get("repetition_penalty") is None:
            default_penalty = getattr(model_defaults, "repetition_penalty", None)
            settings["repetition_penalty"] = default_penalty if default_penalty not in (None, 1.0) else None
        given = temperature is not None or top_p is not None or top_k is not None
        if not given and not getattr(model_defaults, "do_sample", False):
            return cls(do_sample=False, **settings)

        def pick(value, name):
            return value if value is not None else getattr(model_defaults, name, None)

        temperature = pick(temperature, "temperature")
        if temperature is not None and temperature < SAMPLING_EPS:
            return cls(do_sample=False, **settings)
        return cls(do_sample=True, temperature=temperature, top_p=pick(top_p, "top_p"), top_k=pick(top_k, "top_k"),
                   **settings)

    def warpers(self) -> List[LogitsProcessor]:
        """The sampling warpers, in transformers' order (temperature, top-k, top-p, min-p); none when greedy."""
        if not self.do_sample:
            return []
        warpers: List[LogitsProcessor] = []
        if self.temperature is not None and self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p:
            warpers.append(MinPLogitsWarper(float(self.min_p)))
        return warpers


def presence_frequency_penalty(scores: torch.Tensor, completion_ids: Sequence[int], presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI's penalties (platform.openai.com, "Parameter details"):
    ``mu[j] - c[j] * frequency - (c[j] > 0) * presence``, with ``c[j]`` how often token j was
    generated so far in this completion (the prompt does not count).

    Args:
        scores: (vocab,) float logits of one row; not modified.
        completion_ids: the tokens generated so far.
    Returns:
        (vocab,) penalised logits.
    """
    if not completion_ids or (presence == 0 and frequency == 0):
        return scores
    counts = torch.bincount(torch.tensor(completion_ids, device=scores.device), minlength=scores.shape[-1])[: scores.shape[-1]]
    counts = counts.to(scores.dtype)
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


@dataclass
class TokenChoice:
    """A generated token: its id, raw log-probability, and ``top`` alternatives ((id, log-probability), most likely first)."""

    token: int
    logprob: float
    top: Tuple[Tuple[int, float], ...] = ()


def top_entries(logprobs: torch.Tensor, k: int) -> Tuple[Tuple[int, float], ...]:
    """The ``k`` most likely tokens of a (vocab,) log-probability row as ((id, log-probability), ...)."""
    if k <= 0:
        return ()
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return tuple(zip(ids.tolist(), values.tolist()))


@dataclass
class Row:
    """Decoding state of one row: its settings, prompt length, generated tokens, generator and grammar.

    ``grammar`` is a :class:`npu_recipes.serving.grammar.Matcher` or None. ``eos`` holds the
    end-of-turn token ids (``min_tokens`` suppresses them). ``stopped`` is set once the row's job
    has ended (its later tokens are padding). ``choices`` collects the generated tokens'
    log-probabilities when the settings ask for them. ``error`` says why choosing this row's token
    raised (the row is stopped then, and its job is failed alone, its batch goes on).

    Raises:
        ValueError/RuntimeError: from the constructor, a seed ``torch.Generator`` does not take.
    """

    decoding: Decoding
    prompt_length: int
    eos: Sequence[int]
    device: torch.device
    grammar: Optional[object] = None
    generated: List[int] = field(default_factory=list)
    choices: List[TokenChoice] = field(default_factory=list)
    stopped: bool = False
    error: Optional[str] = None

    def __post_init__(self):
        settings = self.decoding
        self._generator = torch.Generator(device=self.device)
        if settings.seed is not None:
            self._generator.manual_seed(settings.seed)
        else:
            self._generator.seed()
        self._processors: List[LogitsProcessor] = []
        if settings.logit_bias:
            self._processors.append(SequenceBiasLogitsProcessor([[[token], float(bias)] for token, bias in settings.logit_bias]))
        if settings.min_tokens:
            self._processors.append(MinNewTokensLengthLogitsProcessor(self.prompt_length, settings.min_tokens, list(self.eos),
                                                                      device=str(self.device)))
        if settings.repetition_penalty is not None and settings.repetition_penalty != 1.0:
            self._processors.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty)))
        self._warpers = settings.warpers()

    @property
    def plain_greedy(self) -> bool:
        """Arg max of the raw logits, nothing else: these rows are chosen together, vectorised."""
        s = self.decoding
        return (not s.do_sample and not self._processors and self.grammar is None and s.presence_penalty == 0
                and s.frequency_penalty == 0)

    def choose(self, ids: torch.Tensor, raw: torch.Tensor) -> int:
        """Pick this row's next token.

        Args:
            ids: (1, prompt + generated) this row's tokens without padding.
            raw: (vocab,) float32 raw logits of the next position.
        Returns:
            The token id.
        """
        scores = raw[None]
        for processor in self._processors:
            scores = processor(ids, scores)
        settings = self.decoding
        scores = presence_frequency_penalty(scores[0], self.generated, settings.presence_penalty,
                                            settings.frequency_penalty)[None]
        if self.grammar is not None:
            scores = self.grammar.mask(scores)
        if not settings.do_sample:
            return int(torch.argmax(scores[0]))
        for warper in self._warpers:
            scores = warper(ids, scores)
        probabilities = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self._generator))

    def record(self, token: int, logprobs: Optional[torch.Tensor]) -> None:
        """Note the chosen token (advancing the grammar) and, when asked for, its log-probabilities."""
        self.generated.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)
        if logprobs is not None and self.decoding.top_logprobs is not None:
            self.choices.append(TokenChoice(token, float(logprobs[token]), top_entries(logprobs, self.decoding.top_logprobs)))


class RowsProcessor(LogitsProcessor):
    """The one logits processor ``generate`` runs: every row picks its own token (module docstring).

    A row whose choice raises is stopped with its ``error`` set (the other rows carry on).

    Args:
        rows: one :class:`Row` per batch row; a stopped row gets ``fallback_token``, which
            ``generate`` pads over.
        pad_lengths: left padding of each row (tokens), to cut it from the ids the row's processors see.
        fallback_token: token given to rows without state.
    """

    def __init__(self, rows: List[Row], pad_lengths: List[int], fallback_token: int):
        self._rows = rows
        self._pad = pad_lengths
        self._fallback = fallback_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` (batch, width) and raw ``scores`` (batch, vocab) -> (batch, vocab), 0 at each row's pick, -inf elsewhere."""
        chosen = torch.argmax(scores, dim=-1).tolist()
        want_logprobs = any(not row.stopped and row.decoding.top_logprobs is not None for row in self._rows)
        logprobs = torch.log_softmax(scores.float(), dim=-1) if want_logprobs else None
        for index, row in enumerate(self._rows):
            if row.stopped:
                chosen[index] = self._fallback
                continue
            try:
                if not row.plain_greedy:
                    chosen[index] = row.choose(input_ids[index:index + 1, self._pad[index]:], scores[index].float())
                row.record(chosen[index], None if logprobs is None else logprobs[index])
            except Exception as error:  # one row's bad settings must not fail the batch
                log.exception("choosing the next token of batch row %d failed", index)
                row.error, row.stopped = f"{type(error).__name__}: {error}", True
                chosen[index] = self._fallback
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(len(chosen), device=scores.device), torch.tensor(chosen, device=scores.device)] = 0
        return out


def prompt_logprobs(model, batch_ids: torch.Tensor, attention_mask: torch.Tensor, top: List[int]) -> List[List[TokenChoice]]:
    """Log-probability of every prompt token given the tokens before it, for a left-padded batch.

    Positions are counted from each row's first real token (as ``generate`` does), so a padded row
    scores as it would alone. The first token of a prompt has no log-probability and is left out.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids).logits`` of shape (batch, width, vocab)).
        batch_ids: (batch, width) left-padded token ids.
        attention_mask: (batch, width), 0 on padding.
        top: per row, how many alternatives to keep for each token.
    Returns:
        Per row, one :class:`TokenChoice` per prompt token after the first.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    results = []
    for row in range(batch_ids.shape[0]):
        start = int((attention_mask[row] == 0).sum())
        targets = batch_ids[row, start + 1:].tolist()
        row_logprobs = logprobs[row, start:]
        results.append([TokenChoice(token, float(row_logprobs[position, token]), top_entries(row_logprobs[position], top[row]))
                        for position, token in enumerate(targets)])
    return results


def bias_table(logit_bias: Optional[Dict[str, float]], vocab_size: int) -> Tuple[Tuple[int, float], ...]:
    """``logit_bias`` ({"token id": bias}) as ((id, bias), ...), checked against the vocabulary.

    Raises:
        ValueError: a key that is not a token id of this model (the message names it).
    """
    table = []
    for key, bias in (logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias key {key!r} is outside this model's vocabulary (0 to {vocab_size - 1})")
        table.append((token, float(bias)))
    return tuple(table)
