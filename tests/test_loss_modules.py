"""qtorch.nn.DistillationLoss and FusedLinearDistillationLoss (API.md, "Modules"): the module
forwards its configuration to the op, matches qtorch.reference, and fails early on bad
arguments."""

import pytest
import torch

import qtorch
from qtorch import reference as R
from qtorch.nn import DistillationLoss, FusedLinearDistillationLoss
from qtorch.testing import assert_close
from tests.conftest import device_for, kernel_backends

KW = [
    dict(),
    dict(temperature=2.0, alpha=0.3, divergence="reverse_kl"),
    dict(temperature=1.5, alpha=0.7, divergence="jsd", beta=0.25, ignore_index=-1),
]


def _data(m=2 * 5, v=37, h=24, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(m, v, generator=g) * 3
    t = torch.randn(m, v, generator=g) * 3
    labels = torch.randint(0, v, (m,), generator=g)
    labels[1] = ignore_index
    labels[6] = ignore_index
    hs, ht = torch.randn(m, h, generator=g), torch.randn(m, h + 8, generator=g)
    ws, wt = torch.randn(v, h, generator=g) * 0.3, torch.randn(v, h + 8, generator=g) * 0.3
    bs, bt = torch.randn(v, generator=g), torch.randn(v, generator=g)
    return s, t, labels, hs, ws, ht, wt, bs, bt


def _ref_reduce(tok, labels, ignore_index, reduction, num_items=None):
    if reduction == "none":
        return tok
    if reduction == "sum":
        return tok.sum()
    denom = num_items if num_items is not None else int((labels != ignore_index).sum())
    return tok.sum() / denom


def _args(kw):
    full = dict(temperature=1.0, alpha=0.5, divergence="kl", beta=0.5, ignore_index=-100)
    full.update(kw)
    return full


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", KW, ids=["default", "reverse_kl", "jsd"])
def test_distillation_loss_module_matches_reference(kw, reduction):
    a = _args(kw)
    s, t, labels, *_ = _data(ignore_index=a["ignore_index"])
    loss_fn = DistillationLoss(reduction=reduction, **kw)
    s3 = s.reshape(2, 5, -1).clone().requires_grad_()
    out = loss_fn(s3, t.reshape(2, 5, -1), labels.reshape(2, 5))
    assert out.dtype == torch.float32
    tok, grad = R.distillation_loss(
        s, t, labels, a["temperature"], a["alpha"], a["divergence"], a["beta"], a["ignore_index"]
    )
    ref = _ref_reduce(tok, labels, a["ignore_index"], reduction)
    assert_close(out.reshape(ref.shape), ref)
    upstream = torch.ones_like(out)
    out.backward(upstream)
    if reduction == "mean":
        grad = grad / int((labels != a["ignore_index"]).sum())
    assert_close(s3.grad.reshape(grad.shape), grad)


def test_distillation_loss_module_num_items_and_no_labels():
    s, t, labels, *_ = _data()
    loss_fn = DistillationLoss(alpha=0.4)
    tok, _ = R.distillation_loss(s, t, labels, 1.0, 0.4)
    assert_close(loss_fn(s, t, labels, num_items_in_batch=32), tok.sum() / 32)
    assert_close(loss_fn(s, t, labels, num_items_in_batch=torch.tensor(32)), tok.sum() / 32)
    with pytest.raises(ValueError, match="alpha"):
        loss_fn(s, t)  # no labels: no hard term, alpha must be 1.0
    soft_only = DistillationLoss(alpha=1.0, temperature=2.0)
    tok, _ = R.distillation_loss(s, t, None, 2.0, 1.0)
    assert_close(soft_only(s, t), tok.mean())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kw", KW, ids=["default", "reverse_kl", "jsd"])
def test_fused_linear_module_matches_reference_and_unfused(kw, bias):
    a = _args(kw)
    _, _, labels, hs, ws, ht, wt, bs, bt = _data(ignore_index=a["ignore_index"])
    bs, bt = (bs, bt) if bias else (None, None)
    loss_fn = FusedLinearDistillationLoss(chunk_size=3, **kw)
    hs_ = hs.clone().requires_grad_()
    ws_ = ws.clone().requires_grad_()
    bs_ = bs.clone().requires_grad_() if bias else None
    out = loss_fn(hs_, ws_, ht, wt, labels, bs_, bt)
    out.backward()
    count = int((labels != a["ignore_index"]).sum())
    token_scale = torch.full((hs.shape[0],), 1.0 / count)
    tok, gh, gw, gb = R.fused_linear_distillation_loss(
        hs,
        ws,
        ht,
        wt,
        labels,
        bs,
        bt,
        token_scale,
        3,
        a["temperature"],
        a["alpha"],
        a["divergence"],
        a["beta"],
        a["ignore_index"],
    )
    assert_close(out, (tok * token_scale).sum())
    assert_close(hs_.grad, gh)
    assert_close(ws_.grad, gw)
    if bias:
        assert_close(bs_.grad, gb)
    # The fused module equals the plain module on materialized logits.
    s_logits = hs @ ws.T + (bs if bias else 0)
    t_logits = ht @ wt.T + (bt if bias else 0)
    assert_close(out, DistillationLoss(**kw)(s_logits, t_logits, labels))


@pytest.mark.parametrize("backend", kernel_backends())
def test_loss_modules_on_every_backend(backend):
    dev = device_for(backend)
    s, t, labels, hs, ws, ht, wt, bs, bt = (x.to(dev) for x in _data())
    tok, _ = R.distillation_loss(s, t, labels, 2.0, 0.5, "kl")
    with qtorch.use_backend(backend):
        out = DistillationLoss(temperature=2.0)(s, t, labels)
        fused = FusedLinearDistillationLoss(temperature=2.0)(hs, ws, ht, wt, labels)
    assert_close(out, tok.sum() / int((labels != -100).sum()))
    with qtorch.use_backend("reference"):
        fused_ref = FusedLinearDistillationLoss(temperature=2.0)(hs, ws, ht, wt, labels)
    assert_close(fused, fused_ref)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="divergence"):
        FusedLinearDistillationLoss(divergence="l2")
    with pytest.raises(ValueError, match="reduction"):
        DistillationLoss(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearDistillationLoss(chunk_size=0)
    r = repr(FusedLinearDistillationLoss(temperature=2.0, chunk_size=64))
    assert "temperature=2.0" in r and "chunk_size=64" in r


def test_module_is_compilable():
    s, t, labels, *_ = _data()
    torch._dynamo.reset()
    loss_fn = DistillationLoss(temperature=2.0, divergence="jsd")
    compiled = torch.compile(loss_fn, fullgraph=True)
    torch.testing.assert_close(compiled(s, t, labels), loss_fn(s, t, labels))
