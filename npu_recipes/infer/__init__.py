"""Generation with a trained model: adapters checked before anything loads
(:mod:`~npu_recipes.infer.adapters`), a base, merged or adapted model loaded for generation
(:mod:`~npu_recipes.infer.loading`), the one generation-config builder and stop set shared by infer,
chat and serve (:mod:`~npu_recipes.infer.generation`), final-answer scoring
(:mod:`~npu_recipes.infer.answers`), batch evaluation (:mod:`~npu_recipes.infer.evaluation`) and the
terminal chat (:mod:`~npu_recipes.infer.chat`).

May import :mod:`npu_recipes.run`, :mod:`npu_recipes.model`, :mod:`npu_recipes.data`,
:mod:`npu_recipes.runtime`, :mod:`npu_recipes.config` and the leaf modules.
"""
