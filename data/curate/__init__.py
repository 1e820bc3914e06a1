"""Curation: raw web crawl / JSONL / Parquet / text -> clean, deduplicated, mixed token shards.

Run with `python -m data.curate` (see `data/curate/__main__.py`); stages are in this package, one
module each, registered by name in `data.curate.base.STAGES` when `data.curate.registry` is imported.
"""
