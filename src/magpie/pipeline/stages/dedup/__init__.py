"""Duplicate instructions: the exact + MinHash-LSH ``index`` (with its cache
next to the output) and semantic ``embeddings``."""
