"""The library behind each ``magpie`` command, one module per command:
``generate``, ``filter``, ``merge``, ``export``, ``stats``, ``doctor``
(``dedup`` lives with its index in :mod:`magpie.pipeline.stages.dedup`)."""
