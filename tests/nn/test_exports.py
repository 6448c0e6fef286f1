"""The ready models are importable from torchmech.nn and from the top level."""

import torchmech
import torchmech.nn as tnn


def test_exported():
    for name in ("NeuralODE", "NeuralSDE", "LatentSDE", "NeuralCDE"):
        assert getattr(torchmech, name) is getattr(tnn, name)
        assert name in torchmech.__all__ and name in tnn.__all__
    assert torchmech.nn is tnn
