"""Training data: where rows come from and the checks of local files (:mod:`~npu_recipes.data.sources`),
rows as chat messages and conversations as tokens with assistant-only labels
(:mod:`~npu_recipes.data.messages`), tokenizing a dataset with HF datasets' cache
(:mod:`~npu_recipes.data.tokenize`), padding-free packing (:mod:`~npu_recipes.data.packing`) and the
generated ``demo_math`` rows (:mod:`~npu_recipes.data.demo`). A dataset in a known shape is one file in
``conf/dataset/``; a new row shape or file type touches the places docs/architecture.md ("Where to
add") lists.

May import :mod:`npu_recipes.config` and the leaf modules.
"""
