"""Completing a batch of jobs with one transformers ``generate`` call (the ``static`` engine).

Prompts are left-padded (``tokenizer.pad`` with the tokenizer's left padding side) and carry an
attention mask, from which ``generate`` derives each row's position ids, so a row's tokens do
not depend on its neighbours beyond float rounding (measured on tiny_qwen2, fp32, CPU: logits of
a row in a 32-row batch differ from the same prompt alone by at most 7e-7; docs/serving.md).
Per-row decisions (a row's own ``max_tokens``, stop strings, a cancelled client) are made by
:class:`BatchProgress`, a ``StoppingCriteria`` that ``generate`` calls after every token with
the sequences so far; it returns one flag per row, so finished rows stop while others go on.
Each row's token is chosen by its own settings in :class:`~npu_recipes.serving.decoding.RowsProcessor`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from npu_recipes.infer import generation
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.runtime.devices import Device
from npu_recipes.serving.decoding import Row, RowsProcessor, prompt_logprobs
from npu_recipes.serving.jobs import Job

log = logging.getLogger(__name__)

REPLACEMENT_CHARACTER = "\ufffd"


class RowText:
    """Incremental detokenization of one generated row, cut at the first stop string.

    Text is released only once it can no longer change: trailing U+FFFD characters (a character
    whose remaining UTF-8 bytes come with the next token) are held back, and so are the last
    ``len(longest stop) - 1`` characters before them (they may begin a stop string). Each token
    decodes only the ids since the last complete character (vLLM's prefix/read offsets), so a
    long row costs the same per token as a short one.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: List[int] = []
        self._prefix = 0
        self._read = 0
        self._final = ""
        self._released = 0

    def _decode(self, start: int, end: Optional[int] = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def _text(self) -> str:
        """All text so far, the incomplete last character included (as U+FFFD)."""
        # Decoding from the token before the last complete character keeps tokenizers that add a
        # leading space at the start of a decode (sentencepiece) from adding one here.
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix)
        pending = after[len(before):]
        if pending and not pending.endswith(REPLACEMENT_CHARACTER):
            self._final += pending
            self._prefix, self._read = self._read, len(self._ids)
            return self._final
        return self._final + pending

    def _release(self, text: str) -> str:
        new = text[self._released:]
        self._released = max(self._released, len(text))
        return new

    def add(self, token_id: int) -> Tuple[str, bool]:
        """Append a token; return (text now safe to send, whether a stop string was reached)."""
        self._ids.append(token_id)
        text = self._text()
        cuts = [found for found in (text.find(stop, self._released) for stop in self._stop) if found >= 0]
        if cuts:
            return self._release(text[: min(cuts)]), True
        complete = text.rstrip(REPLACEMENT_CHARACTER)
        return self._release(text[: max(len(complete) - self._hold, self._released)]), False

    def flush(self) -> str:
        """Everything not yet released (the row has ended without a stop string)."""
        return self._release(self._text())


class BatchProgress(StoppingCriteria):
    """Streams each row's new text to its job and tells ``generate`` which rows are done.

    Called by ``generate`` after every step with ``input_ids`` of shape (batch, prompt width +
    generated so far); the last column holds the token each row just produced (padding for
    rows ``generate`` already finished). Returns a bool tensor of shape (batch,). A row ends at an
    end-of-turn token, a stop string, its ``max_tokens``, a completed grammar or a cancelled client;
    its :class:`~npu_recipes.serving.decoding.Row` is then marked stopped. A row whose token could
    not be chosen (``Row.error``) fails its job.
    """

    def __init__(self, jobs: List[Job], rows: List[Row], tokenizer, eos_token_ids: set):
        self._jobs = jobs
        self._rows = rows
        self._texts = [RowText(tokenizer, job.stop) for job in jobs]
        self._sent = [0] * len(jobs)
        self._eos = eos_token_ids

    def _new_logprobs(self, position: int, drop_last: bool = False) -> tuple:
        choices = self._rows[position].choices
        end = len(choices) - 1 if drop_last and choices else len(choices)
        new = tuple(choices[self._sent[position]:end])
        self._sent[position] = max(self._sent[position], end)
        return new

    def _end(self, position: int, text: str, finish_reason: str, drop_last: bool = False) -> None:
        job = self._jobs[position]
        job.emit(text, self._new_logprobs(position, drop_last))
        job.finish(finish_reason)
        self._rows[position].stopped = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for position, (job, row, token) in enumerate(zip(self._jobs, self._texts, input_ids[:, -1].tolist())):
            if job.done:
                continue
            if self._rows[position].error is not None:
                job.fail(f"generation failed: {self._rows[position].error}")
                continue
            if job.cancelled.is_set():
                job.abandon()
                self._rows[position].stopped = True
                continue
            job.completion_tokens += 1
            if token in self._eos:
                # The end-of-turn token has no text; its log-probability is not reported either.
                self._end(position, row.flush(), "stop", drop_last=True)
                continue
            text, stopped = row.add(token)
            grammar = self._rows[position].grammar
            if stopped or (grammar is not None and grammar.terminated):
                self._end(position, text + ("" if stopped else row.flush()), "stop")
            elif job.completion_tokens >= job.max_tokens:
                self._end(position, text + row.flush(), "length")
            else:
                job.emit(text, self._new_logprobs(position))
        return torch.tensor([job.done for job in self._jobs], dtype=torch.bool, device=input_ids.device)

    def finish_remaining(self) -> None:
        """Close rows ``generate`` ended without a verdict from here (its own length limits)."""
        for position, (job, row) in enumerate(zip(self._jobs, self._texts)):
            if not job.done:
                self._end(position, row.flush(), "length")


class Generator:
    """Runs batches of jobs on a loaded model; call it from one thread only (it switches adapters).

    Args:
        loaded: from :func:`npu_recipes.infer.loading.load` (tokenizer padding on the left).
        device: where the model lives (its first device); inputs are moved there.
    """

    def __init__(self, loaded: LoadedModel, device: Device):
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._device = device
        self._has_adapters = bool(loaded.adapters)
        self.eos = generation.stop_token_ids(self._model.generation_config, self._tokenizer)

    def _adapter(self, name):
        if not self._has_adapters:
            return nullcontext()
        if name is None:
            return self._model.disable_adapter()
        self._model.set_adapter(name)
        return nullcontext()

    def _pad(self, prompts: List[list], target) -> tuple:
        batch = self._tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        pads = [int(batch["input_ids"].shape[1]) - len(prompt) for prompt in prompts]
        return batch["input_ids"].to(target), batch["attention_mask"].to(target), pads

    def __call__(self, jobs: List[Job]) -> None:
        """Complete ``jobs`` (one adapter, any decoding settings): score the prompts that asked for
        it, then one ``generate`` call for the jobs with tokens to generate."""
        # The calling thread is not the one that loaded the model: make the model's device current here.
        self._device.set_current(0)
        target = self._device.torch_device()
        with self._adapter(jobs[0].adapter), torch.inference_mode():
            scored = [job for job in jobs if job.prompt_logprobs is not None]
            if scored:
                ids, mask, _ = self._pad([job.prompt_ids for job in scored], target)
                for job, logprobs in zip(scored, prompt_logprobs(self._model, ids, mask, [j.prompt_logprobs for j in scored])):
                    job.scored(tuple(logprobs))
            for job in jobs:
                if job.max_tokens == 0:
                    job.finish("length")
            jobs = [job for job in jobs if not job.done]
            if jobs:
                self._generate(jobs, target)

    def _rows(self, jobs: List[Job], target) -> List[Row]:
        """Each job's decoding state; a job whose state cannot be made (a seed the generator
        refuses, a grammar that fails to compile) is failed alone and left out."""
        rows = []
        for job in jobs:
            try:
                rows.append(Row(job.decoding, len(job.prompt_ids), self.eos, target,
                                grammar=job.grammar() if job.grammar else None))
            except Exception as error:  # one job's bad settings must not fail the batch
                log.exception("preparing a job's decoding failed")
                job.fail(f"generation failed: {type(error).__name__}: {error}")
        return rows

    def _generate(self, jobs: List[Job], target) -> None:
        rows = self._rows(jobs, target)
        jobs = [job for job in jobs if not job.done]
        if not jobs:
            return
        ids, mask, pads = self._pad([job.prompt_ids for job in jobs], target)
        progress = BatchProgress(jobs, rows, self._tokenizer, set(self.eos))
        # Every row picks its own token in RowsProcessor; generate's own processors stay neutral.
        config = generation.generation_config(
            self._model.generation_config, self._tokenizer, max_new_tokens=max(job.max_tokens for job in jobs),
            do_sample=False, repetition_penalty=1.0,
        )
        self._model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config,
            logits_processor=LogitsProcessorList([RowsProcessor(rows, pads, self.eos[0])]),
            stopping_criteria=StoppingCriteriaList([progress]),
        )
        progress.finish_remaining()
