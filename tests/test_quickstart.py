"""The quickstart example trains with LoRA only and its loss falls, in both modes."""

import importlib.util
import pathlib

import pytest

SPEC = importlib.util.spec_from_file_location("quickstart", pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py")
quickstart = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quickstart)


@pytest.mark.parametrize("mode", ["merged", "lazy"])
def test_quickstart_loss_falls(mode):
    losses = quickstart.main(["--mode", mode, "--steps", "120"])
    assert losses[-1] < 0.05 * losses[0]
