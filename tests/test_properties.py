"""Hypothesis property tests: random shapes and dtypes for every op, on the auto backend
(what users get), against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qtorch import ops
from qtorch import reference as R
from qtorch.testing import assert_close, int8_tie_tolerance

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
dims = st.integers(min_value=1, max_value=70)


def _x(seed, shape, dtype):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


@given(m=dims, k=dims, dtype=dtypes, seed=st.integers(0, 2**16))
def test_quantize_int8_property(m, k, dtype, seed):
    x = _x(seed, (m, k), dtype)
    q, s = ops.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max().item() <= 1
    # dequantization error is at most half a step per element (one step in a flipped tie)
    err = (q.float() * s[:, None] - x.float()).abs()
    assert torch.all(err <= s[:, None] * 1.0001)


@given(
    m=dims,
    k=dims,
    n=dims,
    dtype=dtypes,
    seed=st.integers(0, 2**16),
    lead=st.sampled_from([(), (2,), (1, 3)]),
)
def test_int8_linears_property(m, k, n, dtype, seed, lead):
    x = _x(seed, (*lead, m, k), dtype)
    w_q, w_s = R.quantize_int8(_x(seed + 1, (n, k), torch.float32))
    out = ops.int8_weight_only_linear(x, w_q, w_s)
    assert out.shape == (*lead, m, n) and out.dtype == dtype
    assert_close(out, R.int8_weight_only_linear(x.reshape(-1, k), w_q, w_s).reshape(out.shape))
    out = ops.int8_linear(x, w_q, w_s)
    ref = R.int8_linear(x.reshape(-1, k), w_q, w_s).reshape(out.shape)
    tie = int8_tie_tolerance(R.quantize_int8(x)[1], w_s)
    assert_close(out, ref, scale=max(1.0, ref.abs().max().item(), tie / 1.6e-2))


@given(
    m=dims,
    n=dims,
    groups=st.integers(1, 4),
    gs=st.sampled_from([32, 64, 128, 256]),
    sym=st.booleans(),
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_int4_property(m, n, groups, gs, sym, dtype, seed):
    k = groups * gs
    w = _x(seed, (n, k), dtype)
    qw = ops.quantize_int4(w, gs, sym)
    ref = R.quantize_int4(w, gs, sym)
    assert torch.equal(qw[0], ref[0]) and torch.equal(qw[2], ref[2])
    x = _x(seed + 1, (m, k), dtype)
    out = ops.int4_weight_only_linear(x, *qw, gs)
    assert_close(out, R.int4_weight_only_linear(x, *ref, gs))


@given(
    m=st.integers(1, 20),
    v=st.integers(1, 300),
    dtype=dtypes,
    div=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    T=st.floats(0.5, 4.0),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_distillation_property(m, v, dtype, div, T, alpha, beta, seed):
    s, t = _x(seed, (m, v), dtype), _x(seed + 1, (m, v), dtype)
    labels = torch.randint(0, v, (m,), generator=torch.Generator().manual_seed(seed))
    labels[::4] = -100
    s_req = s.clone().requires_grad_(True)
    out = ops.distillation_loss(
        s_req, t, labels, temperature=T, alpha=alpha, divergence=div, beta=beta, reduction="sum"
    )
    out.backward()
    ref_l, ref_g = R.distillation_loss(s, t, labels, T, alpha, div, beta, -100, True)
    assert out.dtype == torch.float32
    assert_close(out, ref_l.sum(), dtype=torch.float32, scale=max(1.0, ref_l.abs().sum().item()))
    assert_close(s_req.grad, ref_g)
    assert (out >= -1e-4 * m).item()  # every term is non-negative


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(
    m=st.integers(1, 12),
    h=st.integers(1, 24),
    v=st.integers(1, 200),
    chunk=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_fused_property(reduction, m, h, v, chunk, seed):
    hs, ws = _x(seed, (m, h), torch.float32), _x(seed + 1, (v, h), torch.float32) * 0.3
    ht, wt = _x(seed + 2, (m, h), torch.float32), _x(seed + 3, (v, h), torch.float32) * 0.3
    labels = torch.randint(0, v, (m,), generator=torch.Generator().manual_seed(seed))
    hr = hs.clone().requires_grad_(True)
    out = ops.fused_linear_distillation_loss(
        hr, ws, ht, wt, labels, chunk_size=chunk, reduction=reduction
    )
    out.backward()
    s = hs.clone().requires_grad_(True)
    ref = ops.distillation_loss(s @ ws.T, ht @ wt.T, labels, reduction=reduction)
    ref.backward()
    assert_close(out, ref)
    assert_close(hr.grad, s.grad)
