"""Stage one: tokenise a data set and stream it through the frozen backbone into a cache:
inputs (data, tokens, batches), engine (backbone, one unit), plan (decisions and the run both
drivers share), extract (one process) and distributed (dask)."""
