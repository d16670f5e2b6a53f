"""The references against hand-worked values and against independent formulations.
They are the definition of each op, so these tests pin them to API.md."""

import pytest
import torch
import torch.nn.functional as F

from qtorch import reference as R
from qtorch.reference.distillation import _token_losses, _token_losses_and_grads
from qtorch.reference.weight_only import unpack_int4


def test_quantize_int8_worked_example():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = R.quantize_int8(x)
    assert s.dtype == torch.float32 and q.dtype == torch.int8
    assert s.tolist() == [1.0, 1.0]  # amax 127 -> scale 1; all-zero row -> scale 1
    assert q.tolist() == [[1, -2, 0, 127], [0, 0, 0, 0]]  # 0.5 rounds half to even -> 0


def test_quantize_int8_round_half_even_and_clamp():
    x = torch.tensor([[2.5, 3.5, -2.5, 254.0]])  # scale = 2 -> 1.25, 1.75, -1.25, 127
    q, s = R.quantize_int8(x)
    assert s.item() == 2.0
    assert q.tolist() == [[1, 2, -1, 127]]


def test_quantize_int8_stats_in_fp32_for_half_inputs():
    x = torch.randn(4, 33).to(torch.bfloat16)
    q, s = R.quantize_int8(x)
    q32, s32 = R.quantize_int8(x.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)


def test_int4_canonical_packing_nibble_order():
    # Row of 32 values quantized symmetric with amax 7 -> scale 1, q = w + 8.
    w = torch.arange(-8, 24, dtype=torch.float32).clamp(max=7).reshape(1, 32)
    w[0, 0] = -7.0
    qw, sc, z = R.quantize_int4(w, group_size=32, symmetric=True)
    assert qw.shape == (1, 16) and qw.dtype == torch.uint8
    assert sc.tolist() == [[1.0]] and z.tolist() == [[8]]
    q = unpack_int4(qw)
    assert torch.equal(q[0].long(), (w[0] + 8).long())
    # element 0 in the low nibble of byte 0, element 1 in the high nibble
    assert qw[0, 0].item() == (int(w[0, 0]) + 8) | ((int(w[0, 1]) + 8) << 4)


def test_int4_asymmetric_formula():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0] * 8])  # lo = min(0.5, 0) = 0, hi = 3
    qw, sc, z = R.quantize_int4(w, group_size=32)
    assert sc.item() == pytest.approx(3.0 / 15)
    assert z.item() == 0
    wh = R.dequantize_int4(qw, sc, z, 32)
    assert (wh - w).abs().max().item() <= sc.item() / 2 + 1e-7


def test_int4_constant_group_has_unit_scale():
    w = torch.zeros(2, 64)
    qw, sc, z = R.quantize_int4(w, group_size=32)
    assert torch.all(sc == 1.0)
    assert torch.equal(R.dequantize_int4(qw, sc, z, 32), w)


def test_int8_scaled_mm_is_exact_int32():
    a = torch.full((2, 4096), 127, dtype=torch.int8)
    b = torch.full((3, 4096), -127, dtype=torch.int8)
    out = R.int8_scaled_mm(a, b, torch.ones(2), torch.ones(3))
    assert torch.all(out == -127 * 127 * 4096)  # 66 million: exact in fp32 (< 2^26, even)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_closed_form_gradient_matches_autograd(divergence, beta, temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 23, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 23, generator=g, dtype=torch.float64) * 3
    t[0, 4] = float("-inf")
    t[1, :7] = float("-inf")
    labels = torch.tensor([3, 0, -100, 22, 5, -100])
    s_req = s.clone().requires_grad_(True)
    loss = _token_losses(s_req, t, labels, temperature, 0.6, divergence, beta, -100)
    loss.sum().backward()
    loss2, grad = _token_losses_and_grads(s, t, labels, temperature, 0.6, divergence, beta, -100)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(grad, s_req.grad)


def test_kl_matches_torch_kl_div_and_cross_entropy():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    labels = torch.randint(0, 40, (5,), generator=g)
    T, alpha = 2.0, 0.25
    loss, _ = R.distillation_loss(s, t, labels, T, alpha, "kl", 0.5, -100, False)
    soft = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none", log_target=True
    ).sum(-1)
    hard = F.cross_entropy(s, labels, reduction="none")
    torch.testing.assert_close(loss, alpha * T * T * soft + (1 - alpha) * hard)


def test_jsd_is_symmetric_at_half():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    a, _ = R.distillation_loss(s, t, None, 1.0, 1.0, "jsd", 0.5, -100, False)
    b, _ = R.distillation_loss(t, s, None, 1.0, 1.0, "jsd", 0.5, -100, False)
    torch.testing.assert_close(a, b)
    assert torch.all(a >= 0) and torch.all(a <= torch.log(torch.tensor(2.0)) + 1e-6)


def test_ignored_tokens_contribute_nothing_even_nan():
    s = torch.randn(3, 10)
    t = torch.randn(3, 10)
    s[1] = float("nan")
    t[1] = float("inf")
    loss, grad = R.distillation_loss(
        s, t, torch.tensor([1, -100, 2]), 1.0, 0.5, "kl", 0.5, -100, True
    )
    assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_masked_teacher_entries_contribute_zero():
    s = torch.randn(2, 8)
    t = torch.randn(2, 8)
    t_masked = t.clone()
    t_masked[:, 5:] = float("-inf")
    for div in ("kl", "reverse_kl", "jsd"):
        loss, grad = R.distillation_loss(s, t_masked, None, 1.0, 1.0, div, 0.5, -100, True)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), div
    # forward KL over the live entries only equals KL against the renormalised teacher
    loss, _ = R.distillation_loss(s, t_masked, None, 1.0, 1.0, "kl", 0.5, -100, False)
    p = torch.softmax(t[:, :5], -1)
    log_q = torch.log_softmax(s, -1)[:, :5]
    torch.testing.assert_close(loss, (p * (p.log() - log_q)).sum(-1))


def test_nan_logits_give_nan_loss():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    t[0, 3] = float("nan")
    for div in ("kl", "reverse_kl", "jsd"):
        loss, _ = R.distillation_loss(s, t, None, 1.0, 1.0, div, 0.5, -100, False)
        assert torch.isnan(loss[0]) and torch.isfinite(loss[1]), div


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_reference_equals_unfused(chunk):
    g = torch.Generator().manual_seed(4)
    m, h, v = 10, 16, 37
    hs, ws, bs = (
        torch.randn(m, h, generator=g),
        torch.randn(v, h, generator=g),
        torch.randn(v, generator=g),
    )
    ht, wt = torch.randn(m, h + 5, generator=g), torch.randn(v, h + 5, generator=g)
    labels = torch.randint(0, v, (m,), generator=g)
    labels[2] = -100
    scale = torch.rand(m, generator=g)
    loss, gh, gw, gb = R.fused_linear_distillation_loss(
        hs, ws, ht, wt, labels, bs, None, scale, chunk, 2.0, 0.5, "jsd", 0.4, -100, True
    )
    hr, wr, br = (x.clone().requires_grad_(True) for x in (hs, ws, bs))
    tok = _token_losses(hr @ wr.T + br, ht @ wt.T, labels, 2.0, 0.5, "jsd", 0.4, -100)
    (tok * scale).sum().backward()
    torch.testing.assert_close(loss, tok.detach())
    torch.testing.assert_close(gh, hr.grad)
    torch.testing.assert_close(gw, wr.grad)
    torch.testing.assert_close(gb, br.grad)
