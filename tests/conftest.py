"""Makes the example modules importable from tests (``import quickstart``, ``import minilm``)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "examples"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
