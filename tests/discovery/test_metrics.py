"""Discovery metrics on hand-made coefficient matrices."""

import math

import pytest
import torch

from torchmech.discovery import metrics


def test_support_and_coefficient_metrics():
    true = torch.tensor([[1.0, 0.0, 2.0], [0.0, -4.0, 0.0]])
    found = torch.tensor([[1.1, 0.5, 2.0], [0.0, 0.0, 0.0]])
    assert float(metrics.support_precision(found, true)) == pytest.approx(2 / 3)
    assert float(metrics.support_recall(found, true)) == pytest.approx(2 / 3)
    assert float(metrics.support_f1(found, true)) == pytest.approx(2 / 3)
    assert not bool(metrics.exact_recovery(found, true)) and bool(metrics.exact_recovery(true * 2, true))
    assert float(metrics.coefficient_error(found, true, "max")) == pytest.approx(1.0)
    assert float(metrics.coefficient_error(found, true, "median")) == pytest.approx(0.1)
    assert float(metrics.coefficient_error(found, true, "mean")) == pytest.approx(1.1 / 3)
    rel = metrics.coefficient_error(found, true, "none")
    assert math.isnan(rel[0, 1]) and rel[0, 0] == pytest.approx(0.1)
    batch = torch.stack([found, true])
    assert metrics.exact_recovery(batch, torch.stack([true, true])).tolist() == [False, True]
    report = metrics.discovery_report(found, true)
    assert set(report) == {"precision", "recall", "f1", "exact", "median_rel_error", "max_rel_error"}


def test_r2_scores():
    t = torch.linspace(0, 1, 100)
    true = torch.stack([torch.sin(6 * t), t], -1)
    assert float(metrics.trajectory_r2(true, true)) == 1.0
    assert float(metrics.derivative_r2(true.mean(0).expand_as(true), true)) == pytest.approx(0.0, abs=1e-6)
    bad = true.clone()
    bad[50] = float("nan")
    assert float(metrics.trajectory_r2(bad, true)) == -float("inf")


def test_bad_inputs():
    with pytest.raises(ValueError, match="found: expected the shape of true"):
        metrics.support_f1(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reduction"):
        metrics.coefficient_error(torch.ones(2, 2), torch.ones(2, 2), "sum")
    with pytest.raises(TypeError):
        metrics.exact_recovery([[1.0]], torch.ones(1, 1))


def test_degenerate_cases_give_numbers_not_nan():
    # constant reference: 1 for a perfect prediction, 0 otherwise (scikit-learn's convention)
    const = torch.ones(10, 2)
    assert float(metrics.r2_score(const, const)) == 1.0
    assert float(metrics.r2_score(const + 1, const)) == 0.0
    # no true terms: nothing on the true support can be wrong
    for reduction in ("median", "mean", "max"):
        assert float(metrics.coefficient_error(torch.ones(2, 3), torch.zeros(2, 3), reduction)) == 0.0
