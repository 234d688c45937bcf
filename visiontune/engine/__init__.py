"""Training loops and evaluation."""
