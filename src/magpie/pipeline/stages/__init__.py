"""The stages a pair passes on its way to the dataset, in flow order:
``clean`` (reject reasons for model text), ``filters`` (rules), ``judge``
(the LLM judge) and ``dedup`` (exact, near and semantic duplicates)."""
