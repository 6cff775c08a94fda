"""The serve stage's OpenAI-compatible HTTP server (see docs/serving.md).

* :mod:`~npu_recipes.serving.protocol`: pydantic request/response models in OpenAI's wire format;
* :mod:`~npu_recipes.serving.jobs`: one choice to complete, its decoding settings and its result channel;
* :mod:`~npu_recipes.serving.decoding`: each row's own token choice and log-probabilities;
* :mod:`~npu_recipes.serving.grammar`, :mod:`~npu_recipes.serving.tools`: constrained JSON, tool calls;
* :mod:`~npu_recipes.serving.generation`: one left-padded ``generate`` call for a batch of jobs;
* :mod:`~npu_recipes.serving.batcher`: the queue that groups compatible jobs into batches;
* :mod:`~npu_recipes.serving.engines`: the static batcher or transformers' continuous batching;
* :mod:`~npu_recipes.serving.app`, :mod:`~npu_recipes.serving.completions`,
  :mod:`~npu_recipes.serving.replies`, :mod:`~npu_recipes.serving.metrics`: the FastAPI routes,
  authentication, error replies, reply assembly and Prometheus metrics;
* :mod:`~npu_recipes.serving.server`: bind the port, build the app, run uvicorn;
* :mod:`~npu_recipes.serving.launcher`: start a server process and wait until it answers.

May import :mod:`npu_recipes.infer` and everything below it (run, model, data, runtime, config, leaf modules).
"""
