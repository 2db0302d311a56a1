"""What magpie keeps on disk: the dataset's JSONL (``jsonl``), the files
replaced atomically (``atomic``), the run manifest, the output lock, and the
checks every write target passes (``targets``)."""
