"""What magpie keeps on disk: the dataset's JSONL and its one reader
(``jsonl``), the names of the files beside it (``dataset``), the files replaced
atomically (``atomic``), the run manifest, the output lock, and the checks every
write target passes (``targets``)."""
