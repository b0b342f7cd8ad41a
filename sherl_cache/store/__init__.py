"""The cache on disk: its format and reader (cache), writer (writer) and integrity checks
(verify)."""
