"""Tasks, the files and GLUE folders they are read from, and their metrics."""
