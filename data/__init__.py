"""Text and token ids: readers, the embedded stdlib corpus, tokenizer, shards and the Grain pipeline.

Import the submodules directly (`from data import pipeline`); this package imports nothing itself so
that `import data.readers` stays cheap (no grain/sentencepiece start-up cost). The one-shot entry point
is `python -m data.prepare` (see its docstring).
"""
