"""Using a trained run: predict new examples and score splits."""
