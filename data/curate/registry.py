"""Imports every stage module so each registers its name in `data.curate.base.STAGES`.

Library module; the runner and the config preset import it. A new stage module is added here.
"""
from data.curate import c4  # noqa: F401
from data.curate import decontam  # noqa: F401
from data.curate import dedup_exact  # noqa: F401
from data.curate import extract  # noqa: F401
from data.curate import fineweb  # noqa: F401
from data.curate import gopher  # noqa: F401
from data.curate import langid  # noqa: F401
from data.curate import line_dedup  # noqa: F401
from data.curate import minhash  # noqa: F401
from data.curate import perplexity  # noqa: F401
from data.curate import pii  # noqa: F401
from data.curate import quality  # noqa: F401
from data.curate import toxic  # noqa: F401
