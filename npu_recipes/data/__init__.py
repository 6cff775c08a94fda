"""Training data: where rows come from and the checks of local files (:mod:`~npu_recipes.data.sources`),
rows as chat messages and conversations as tokens with assistant-only labels
(:mod:`~npu_recipes.data.messages`), tokenizing a dataset with HF datasets' cache
(:mod:`~npu_recipes.data.tokenize`), padding-free packing (:mod:`~npu_recipes.data.packing`) and the
generated ``demo_math`` rows (:mod:`~npu_recipes.data.demo`). A new dataset format is a
:class:`~npu_recipes.config.schema.DatasetConfig` option in ``conf/dataset/`` (column templates or a
messages column); a new file type or hub is a branch of :func:`npu_recipes.data.sources.load_rows`.

May import :mod:`npu_recipes.config` and the leaf modules.
"""
