"""The stages a pair passes on its way to the dataset, each a
:class:`~magpie.pipeline.stages.base.Stage`, in flow order: ``clean`` (reject
reasons for model text), ``reasoning`` (no thinking in an instruction),
``filters`` (rules), ``dedup`` (exact, near and semantic duplicates), ``judge``
(the LLM judge), ``balance`` (category caps) and ``guard`` (a safety
classifier)."""
