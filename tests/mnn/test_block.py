"""MechanisticBlock: any batch at call time, learnable steps, documented output structure."""

import importlib.util
import pathlib

import pytest
import torch

from torchmech.mnn import MechanisticBlock, solve_linear_ode

f64 = torch.float64


def inputs(B, T=12, D=2, E=2, K=3, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(*B, T, E, D, K, generator=g, dtype=f64).to(dtype)
    r = torch.randn(*B, T, E, generator=g, dtype=f64).to(dtype)
    i = torch.randn(*B, 1, D, 2, generator=g, dtype=f64).to(dtype)
    return c, r, i


@pytest.mark.parametrize("B", [(), (1,), (5,), (2, 3)])
def test_any_batch_shape_and_output_structure(B):
    block = MechanisticBlock(order=2, step=0.1)
    c, r, i = inputs(B)
    out = block(c, r, i)
    assert out.u.shape == B + (12, 2, 3)
    assert torch.equal(out.values, out.u[..., 0])
    assert torch.equal(out.derivatives, out.u[..., 1:])
    assert torch.allclose(out.steps, torch.full((1,), 0.1, dtype=f64))
    ref = solve_linear_ode(c, r, i, out.steps, method="dense")
    assert torch.allclose(out.u, ref, rtol=1e-9, atol=1e-10)


def test_same_block_serves_different_batch_sizes_and_lengths():
    block = MechanisticBlock(order=2, step=0.05)
    for B, T in [(3, 8), (7, 15)]:
        c, r, i = inputs((B,), T=T)
        assert block(c, r, i).values.shape == (B, T, 2)


def test_learnable_steps_receive_gradients_and_start_at_step():
    block = MechanisticBlock(order=2, step=0.07, learn_steps=True, per_step_steps=True, num_points=12)
    assert torch.allclose(block.steps, torch.full((11,), 0.07))
    block.to(f64)
    c, r, i = inputs((4,))
    block(c, r, i).values.square().sum().backward()
    g = block.raw_steps.grad
    assert g is not None and g.shape == (11,) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_explicit_steps_override_and_float32():
    block = MechanisticBlock(order=2)
    c, r, i = inputs((3,), dtype=torch.float32)
    steps = torch.full((3, 11), 0.02)
    out = block(c, r, i, steps)
    assert out.u.dtype == torch.float32
    assert out.steps is steps
    ref = solve_linear_ode(c.double(), r.double(), i.double(), steps.double())
    assert torch.allclose(out.u.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_bad_construction_and_call():
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        MechanisticBlock(order=0)
    with pytest.raises(ValueError, match="step must be at least float32's smallest normal number"):
        MechanisticBlock(step=1e-50)
    with pytest.raises(ValueError, match="step must be a positive"):
        MechanisticBlock(step=-1.0)
    with pytest.raises(ValueError, match="needs num_points"):
        MechanisticBlock(learn_steps=True, per_step_steps=True)
    with pytest.raises(ValueError, match="per_step_steps=True needs num_points"):
        MechanisticBlock(per_step_steps=True)  # a fixed per-step vector needs T too
    with pytest.raises(ValueError, match="method must be one of"):
        MechanisticBlock(method="fast")
    with pytest.raises(TypeError, match=r"coefficients must be a tensor of shape \(..., T, E, D, 3\), got list"):
        MechanisticBlock()([[[[[1.0, 0.0, 1.0]]]]], torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 2))
    c, r, i = inputs((2,), K=4)
    with pytest.raises(ValueError, match="K = order \\+ 1 = 3"):
        MechanisticBlock(order=2)(c, r, i)
    # checked at construction, not at the first forward
    with pytest.raises(ValueError, match="weight_smooth must be a positive finite float or a tensor, got -1.0"):
        MechanisticBlock(weight_smooth=-1.0)
    with pytest.raises(ValueError, match="slack must be a finite float or a tensor or None, got 'abc'"):
        MechanisticBlock(slack="abc")
    # learnable weights and slack stay tensors (as in solve_linear_ode)
    c, r, i = inputs((2,))
    for kw in ({"weight_equation": torch.nn.Parameter(torch.tensor(2.0))}, {"slack": torch.tensor(0.1)}):
        assert MechanisticBlock(**kw)(c, r, i).values.shape == (2, 12, 2)  # (B, T, D)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    c, r, i = inputs((2,))
    ref = MechanisticBlock(num_points=c.shape[-4], weight_smooth=0.5)(c, r, i).values
    got = MechanisticBlock(np.int64(2), num_points=np.int64(c.shape[-4]), step=np.float32(0.1),
                           weight_smooth=np.float32(0.5))(c, r, i).values
    torch.testing.assert_close(got, ref)
    u = solve_linear_ode(c, r, i, 0.1, weight_equation=np.float64(2.0), num_points=np.int32(c.shape[-4]))
    torch.testing.assert_close(u, solve_linear_ode(c, r, i, 0.1, weight_equation=2.0))


def test_damped_sine_example_fits():
    path = pathlib.Path(__file__).parents[2] / "examples" / "mnn_fit_damped_sine.py"
    spec = importlib.util.spec_from_file_location("example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rel = mod.main(["--iters", "150", "--points", "100", "--noise", "0.02"])
    assert rel < 0.15
