"""The lean ODE loop's record filter (large states, sparse save times) changes memory, not results."""

import pytest
import torch

import torchmech.de as de
from torchmech.de import _fast


@pytest.mark.parametrize("ts", [[0.0, 1.0], [0.0, 0.3, 0.31, 0.9, 1.0]])
def test_filtered_records_give_identical_saves(monkeypatch, ts):
    torch.manual_seed(0)
    B, n = 7, 5
    A = torch.randn(n, n, dtype=torch.float64) / n
    y0 = torch.randn(B, n, dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.95, 1.0, 0.8, 1.0, 1.0, 0.99], dtype=torch.float64)
    ts = torch.tensor(ts, dtype=torch.float64)
    saveat = de.SaveAt(ts=ts * 0.8)  # inside every sample's interval

    def run():
        return de.solve(lambda t, y, a: torch.tanh(y @ A), de.Dopri5(), 0.0, t1, y0, saveat=saveat,
                        controller=de.PIDController(1e-6, 1e-8)).ys

    monkeypatch.setattr(_fast, "_FILTER_BYTES", 10 ** 12)
    ref = run()
    monkeypatch.setattr(_fast, "_FILTER_BYTES", 0)
    kept = []
    real = _fast.save_pass
    def spy(P, integ, buf, recs, *rest):
        kept.append(len(recs))
        return real(P, integ, buf, recs, *rest)

    monkeypatch.setattr(_fast, "save_pass", spy)
    out = run()
    assert torch.equal(out, ref)
    assert max(kept) <= 4
