"""Publishing a dataset the Hugging Face way: ``folder`` (a ``datasets``-loadable
folder of Parquet shards beside its card), ``card`` (the ``README.md`` dataset
card, from the manifest and ``magpie stats``), ``columns`` (the Parquet schema),
``fields`` (the record's shape and field documentation, read from the model)."""
