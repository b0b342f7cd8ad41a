"""Stage one: tokenise a data set and stream it through the frozen backbone into a cache."""
