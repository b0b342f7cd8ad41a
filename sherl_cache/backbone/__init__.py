"""A backbone checkpoint: finding and identifying it (hub), running it frozen (frozen), and
rebuilding its last k layers from its tensors (late)."""
