"""The one exception type for bad input anywhere in `data/`.

Every reader, builder and loader raises `DataError` with a single line naming the file (and the line or
record where there is one) and the problem, so a CLI can print `str(err)` and exit non-zero. It
subclasses ValueError so callers that already catch ValueError keep working.
"""


class DataError(ValueError):
  """Bad input data: missing/empty/corrupt file, malformed record, vocab mismatch."""
