"""Bad input: TypeError for a wrong dtype, ValueError for a wrong shape, each naming the
argument; never a crash or a silently wrong result. Checked on the eager path and, for a
sample, under torch.compile (the fake impls run the same checks)."""

import pytest
import torch

from qtorch import ops
from qtorch import reference as R

X = torch.randn(4, 64)
WQ, WS = R.quantize_int8(torch.randn(8, 64))
QW = R.quantize_int4(torch.randn(8, 64), 32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.quantize_int8(X.to(torch.int32)), TypeError, "x must have dtype"),
        (lambda: ops.quantize_int8(torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
        (lambda: ops.quantize_int8(torch.randn(3, 0)), ValueError, "K"),
        (lambda: ops.quantize_int8([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: ops.int8_scaled_mm(X, WQ, torch.ones(4), WS), TypeError, "a must have dtype"),
        (
            lambda: ops.int8_scaled_mm(WQ, WQ.float(), torch.ones(8), WS),
            TypeError,
            "b must have dtype",
        ),
        (lambda: ops.int8_scaled_mm(WQ[None], WQ, torch.ones(8), WS), ValueError, "a must be 2-D"),
        (lambda: ops.int8_scaled_mm(WQ[:, :32], WQ, torch.ones(8), WS), ValueError, "share K"),
        (lambda: ops.int8_scaled_mm(WQ, WQ, torch.ones(7), WS), ValueError, "scale_a"),
        (lambda: ops.int8_scaled_mm(WQ, WQ, torch.ones(8), WS.half()), TypeError, "scale_b"),
        (lambda: ops.int8_scaled_mm(WQ, WQ, torch.ones(8), WS, torch.ones(3)), ValueError, "bias"),
        (
            lambda: ops.int8_scaled_mm(WQ, WQ, torch.ones(8), WS, None, torch.int32),
            TypeError,
            "out_dtype",
        ),
        (lambda: ops.int8_linear(X.double(), WQ, WS), TypeError, "x must have dtype"),
        (lambda: ops.int8_linear(X[:, :63], WQ, WS), ValueError, "share K"),
        (lambda: ops.int8_linear(X, WQ.float(), WS), TypeError, "w_q"),
        (lambda: ops.int8_linear(X, WQ, WS[:7]), ValueError, "w_scale"),
        (
            lambda: ops.int8_weight_only_linear(X, WQ, WS, torch.ones(8, dtype=torch.int64)),
            TypeError,
            "bias",
        ),
        (lambda: ops.quantize_int4(torch.randn(8, 100), 32), ValueError, "divisible by group_size"),
        (
            lambda: ops.quantize_int4(torch.randn(8, 64), 48),
            ValueError,
            "group_size must be one of",
        ),
        (lambda: ops.quantize_int4(torch.randn(8, 64).long(), 32), TypeError, "w must have dtype"),
        (lambda: ops.dequantize_int4(QW[0].to(torch.int8), QW[1], QW[2], 32), TypeError, "qweight"),
        (lambda: ops.dequantize_int4(QW[0], QW[1][:, :1], QW[2], 32), ValueError, "scales"),
        (lambda: ops.int4_weight_only_linear(X, *QW, 64), ValueError, "scales"),
        (lambda: ops.int4_weight_only_linear(X[:, :32], *QW, 32), ValueError, "x"),
        (
            lambda: ops.int4_weight_only_linear(X, QW[0], QW[1].half(), QW[2], 32),
            TypeError,
            "scales",
        ),
    ],
)
def test_quant_op_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


S = torch.randn(2, 3, 10)
T = torch.randn(2, 3, 10)
L = torch.randint(0, 10, (2, 3))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.distillation_loss(S, T[..., :9], L), ValueError, r"\(2, 3, 10\).*\(2, 3, 9\)"),
        (lambda: ops.distillation_loss(S, T[:1], L), ValueError, "same shape"),
        (lambda: ops.distillation_loss(S, T, L[:, :2]), ValueError, "labels must have shape"),
        (lambda: ops.distillation_loss(S, T, L.float()), TypeError, "labels must be an integer"),
        (lambda: ops.distillation_loss(S.long(), T, L), TypeError, "student_logits"),
        (lambda: ops.distillation_loss(S, T, None), ValueError, "alpha must be 1.0"),
        (lambda: ops.distillation_loss(S, T, L, temperature=0.0), ValueError, "temperature"),
        (lambda: ops.distillation_loss(S, T, L, alpha=1.5), ValueError, "alpha"),
        (lambda: ops.distillation_loss(S, T, L, beta=-0.1), ValueError, "beta"),
        (lambda: ops.distillation_loss(S, T, L, divergence="tvd"), ValueError, "divergence"),
        (lambda: ops.distillation_loss(S, T, L, reduction="avg"), ValueError, "reduction"),
        (
            lambda: ops.distillation_loss(S, T, L, num_items_in_batch=torch.ones(2)),
            ValueError,
            "num_items_in_batch",
        ),
        (
            lambda: ops.distillation_loss(S, T, L, num_items_in_batch=2.5),
            TypeError,
            "num_items_in_batch",
        ),
        (
            lambda: ops.distillation_loss(S, T, torch.full((2, 3), 10)),
            ValueError,
            r"labels: value 10 is outside \[0, 10\)",
        ),
        (lambda: ops.distillation_loss(S, T, torch.full((2, 3), -5)), ValueError, "labels"),
        (
            lambda: ops.fused_linear_distillation_loss(
                torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 6), torch.randn(11, 6)
            ),
            ValueError,
            r"\(10, 8\).*\(11, 6\)",
        ),
        (
            lambda: ops.fused_linear_distillation_loss(
                torch.randn(4, 8), torch.randn(10, 7), torch.randn(4, 6), torch.randn(10, 6)
            ),
            ValueError,
            "share H",
        ),
        (
            lambda: ops.fused_linear_distillation_loss(
                torch.randn(4, 8),
                torch.randn(10, 8),
                torch.randn(4, 6),
                torch.randn(10, 6),
                torch.full((4,), 99),
                alpha=0.5,
            ),
            ValueError,
            "labels",
        ),
        (
            lambda: ops.fused_linear_distillation_loss(
                torch.randn(4, 8),
                torch.randn(10, 8),
                torch.randn(4, 6),
                torch.randn(10, 6),
                alpha=1.0,
                chunk_size=0,
            ),
            ValueError,
            "chunk_size",
        ),
    ],
)
def test_loss_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_errors_under_torch_compile():
    f = torch.compile(lambda x: ops.int8_linear(x, WQ, WS), fullgraph=True)
    with pytest.raises(Exception, match="share K"):
        f(X[:, :32])
