"""Tasks: what one kind of model does inside the one training loop (engine/loop.py)."""
