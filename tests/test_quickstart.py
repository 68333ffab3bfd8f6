"""The quickstart example trains with LoRA only and its loss falls, in both modes."""

import pytest
from examples import quickstart


@pytest.mark.parametrize("mode", ["merged", "lazy"])
def test_quickstart_loss_falls(mode):
    losses = quickstart.main(["--mode", mode, "--steps", "120"])
    assert losses[-1] < 0.05 * losses[0]
