"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step:
millions of values per step, so the cost is memory passes, and this package is written to make
few of them, into reused buffers. ``summary`` says what a summary is; ``collect`` gathers them as
a step makes its tensors (:class:`Summaries`, :func:`summarize`); ``_readable`` says what of a
tensor may be read (not a storage freed under it; a ``DTensor``'s local shard); ``_host`` and
``_device`` do the work on the CPU and on an accelerator; ``_histogram`` derives exact histogram
edges.
"""

from lens_core.summaries._readable import local_shard, storage_intact
from lens_core.summaries.collect import Summaries, summarize
from lens_core.summaries.summary import Histogram, LocalShard, TensorSummary, check_bins

__all__ = [
    "Histogram",
    "LocalShard",
    "Summaries",
    "TensorSummary",
    "check_bins",
    "local_shard",
    "storage_intact",
    "summarize",
]
