"""Runnable examples (``python examples/<name>.py``) and their shared pieces; model ports live in ``examples.models``."""
