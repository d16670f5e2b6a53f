"""distillation_loss and fused_linear_distillation_loss (definition: qtorch.reference.distillation).

Per token (row) i, all in fp32, with z = s / T, u = t / T, q = softmax(z), p = softmax(u):
    "kl"          D = Σ_live p (log p − log q)           dD/dz = q − p
    "reverse_kl"  D = Σ_live q (log q − log p)           dD/dz_j = q_j (live_j (log q_j − log p_j + 1)
                                                                      − D − Q_live),  Q_live = Σ_live q
    "jsd"         D = β Σ_live p (log p − log m) + (1 − β) Σ q (log q − log m),  m = β p + (1 − β) q
                  dD/dz_j = q_j (g_j − Σ_k q_k g_k),  g_j = (1 − β)(log q_j − log m_j)
    loss_i  = α T² D + (1 − α) (lse(s) − s[label])
    dloss_i/ds = α T dD/dz + (1 − α) (softmax(s) − onehot(label))
"live" excludes entries the teacher masked with −inf (p = 0, every term of the entry is 0).
A β term whose weight is 0 is left out (no 0 · inf), as in the reference.

`_distill_kernel` runs one program per row and sweeps the vocabulary in BLOCK_V blocks:
    pass 1  online max / sum-of-exp for z, u and s (rescaling the running sum when the max
            grows), so lse_z, lse_u, lse_s come out of one read of the row;
    pass 2  the loss terms (and, for "kl", the gradient, which needs no row-wide sum);
    pass 3  ("reverse_kl", "jsd") the gradient, which needs D (resp. Σ q g) from pass 2.
The gradient may be written in place over the student logits: every block is read before
the same block is written, and s[label] is read in pass 1.

fused_linear_distillation_loss is the one chunk loop (qtorch/reference/distillation.py) with
`chunk_loss` below as its per-chunk kernel: the fp32 logits of a chunk go in, the kernel
overwrites the student's with token_scale_i · dloss_i/ds. The GEMMs around it are the Triton
adapter's choice (qtorch/backends/triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtorch._kernels import INTERPRET

from qtorch.reference.distillation import DIVERGENCES, check_labels

_NEG_INF = float("-inf")


@triton.jit
def _log_mix(log_p, log_q, beta, omb):
    """log m = log(β p + (1 − β) q) in log space (as the reference's _log_mix): finite where p
    or q is representable in log space, where log(β p + (1 − β) q) of underflowed p and q gives
    -inf and then 0 · inf = NaN (e.g. T = 0.01)."""
    a = tl.log(beta) + log_p  # -inf when β = 0
    b = tl.log(omb) + log_q  # -inf when β = 1
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _online_update(m, d, x):
    """Running (max, Σ exp(x − max)) over blocks: m, d fp32 scalars, x an fp32 block.
    Rows that are all −inf so far keep m = −inf and d = 0 (no −inf − −inf = NaN); +inf or
    NaN logits make d NaN, so they surface as a non-finite loss."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, d


@triton.jit
def _distill_kernel(
    s_ptr,  # [M, V] student logits, fp32/fp16/bf16, row stride stride_s
    t_ptr,  # [M, V] teacher logits, row stride stride_t
    lab_ptr,  # [M] int64 labels (dummy when HAS_LABELS is False)
    loss_ptr,  # [M] fp32 out: per-token loss, 0 where ignored
    g_ptr,  # [M, V] out, student dtype, row stride stride_g (may alias s_ptr)
    scale_ptr,  # [M] fp32 per-token gradient weights (dummy when HAS_SCALE is False)
    V,
    stride_s,
    stride_t,
    stride_g,
    inv_temp,  # 1 / T
    temp,  # T
    alpha,
    beta,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DIV: tl.constexpr,  # 0 "kl", 1 "reverse_kl", 2 "jsd"
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    cols0 = tl.arange(0, BLOCK_V)
    label = -1
    ignored = False
    if HAS_LABELS:
        label = tl.load(lab_ptr + row)
        ignored = label == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                zero = tl.zeros((BLOCK_V,), dtype=tl.float32)
                tl.store(g_row + cols, zero.to(g_ptr.dtype.element_ty), mask=cols < V)
    else:
        # ---- pass 1: log-sum-exp of z = s/T, u = t/T and (for the hard term) s
        m_z = tl.full((), float("-inf"), tl.float32)
        m_u = tl.full((), float("-inf"), tl.float32)
        m_s = tl.full((), float("-inf"), tl.float32)
        d_z = tl.zeros((), tl.float32)
        d_u = tl.zeros((), tl.float32)
        d_s = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_z, d_z = _online_update(m_z, d_z, s * inv_temp)
            m_u, d_u = _online_update(m_u, d_u, t * inv_temp)
            if HAS_LABELS:
                m_s, d_s = _online_update(m_s, d_s, s)
        lse_z = m_z + tl.log(d_z)
        lse_u = m_u + tl.log(d_u)
        ce = 0.0
        lse_s = 0.0
        if HAS_LABELS:
            lse_s = m_s + tl.log(d_s)
            ce = lse_s - tl.load(s_row + label).to(tl.float32)  # read before any grad write
        omb = 1.0 - beta
        soft_g = alpha * temp  # d(α T² D)/ds = α T dD/dz
        if HAS_SCALE:
            tok_scale = tl.load(scale_ptr + row)
        else:
            tok_scale = 1.0
        # ---- pass 2: loss terms (and the "kl" gradient)
        acc1 = tl.zeros((BLOCK_V,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            live = mask & (t != float("-inf"))
            log_q = s * inv_temp - lse_z
            log_p = t * inv_temp - lse_u
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            if DIV == 0:
                acc1 += tl.where(live, p * (log_p - log_q), 0.0)
                if COMPUTE_GRAD:
                    g = soft_g * (q - p)
                    if HAS_LABELS:
                        g += (1.0 - alpha) * (tl.exp(s - lse_s) - tl.where(cols == label, 1.0, 0.0))
                    g = g * tok_scale
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
            elif DIV == 1:
                acc1 += tl.where(live, q * (log_q - log_p), 0.0)
                acc2 += tl.where(live, q, 0.0)
            else:
                log_m = _log_mix(log_p, log_q, beta, omb)
                acc1 += tl.where(live, p * (log_p - log_m), 0.0)
                acc2 += tl.where(mask, q * (log_q - log_m), 0.0)
        sum1 = tl.sum(acc1, axis=0)
        sum2 = tl.sum(acc2, axis=0)
        if DIV == 2:
            div = tl.where(beta != 0.0, beta * sum1, 0.0) + tl.where(omb != 0.0, omb * sum2, 0.0)
        else:
            div = sum1
        loss = alpha * temp * temp * div
        if HAS_LABELS:
            loss += (1.0 - alpha) * ce
        tl.store(loss_ptr + row, loss)
        # ---- pass 3: gradients that need a row-wide sum from pass 2
        if COMPUTE_GRAD and DIV != 0:
            qg = tl.where(omb != 0.0, omb * sum2, 0.0)  # jsd: Σ_k q_k g_k
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                live = mask & (t != float("-inf"))
                log_q = s * inv_temp - lse_z
                log_p = t * inv_temp - lse_u
                q = tl.exp(log_q)
                if DIV == 1:
                    dz = q * (tl.where(live, log_q - log_p + 1.0, 0.0) - div - sum2)
                else:
                    log_m = _log_mix(log_p, log_q, beta, omb)
                    gj = tl.where(omb != 0.0, omb * (log_q - log_m), 0.0)
                    dz = q * (gj - qg)
                g = soft_g * dz
                if HAS_LABELS:
                    g += (1.0 - alpha) * (tl.exp(s - lse_s) - tl.where(cols == label, 1.0, 0.0))
                g = g * tok_scale
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _block_v(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). GPU: 4096-wide blocks (16 KiB of fp32 per operand in registers
    across 16 warps); the interpreter: up to 16384, fewer loop trips."""
    cap = 16384 if INTERPRET else 4096
    block = min(cap, triton.next_power_of_2(max(v, 16)))
    return block, max(1, min(16, block // 256))


def _launch(
    student,
    teacher,
    labels,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    grad_out,
    token_scale,
) -> torch.Tensor:
    """Run the loss kernel; returns loss fp32 [M]; fills grad_out (may be `student`) if given."""
    m, v = student.shape
    loss = torch.empty((m,), dtype=torch.float32, device=student.device)
    if m == 0:
        return loss
    block, warps = _block_v(v)
    compute_grad = grad_out is not None
    g = grad_out if compute_grad else student  # never written when not computing the grad
    _distill_kernel[(m,)](
        student,
        teacher,
        labels if labels is not None else loss,
        loss,
        g,
        token_scale if token_scale is not None else loss,
        v,
        student.stride(0),
        teacher.stride(0),
        g.stride(0),
        1.0 / temperature,
        float(temperature),
        float(alpha),
        float(beta),
        int(ignore_index),
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=compute_grad,
        HAS_SCALE=token_scale is not None,
        DIV=DIVERGENCES.index(divergence),
        BLOCK_V=block,
        num_warps=warps,
    )
    return loss


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """student, teacher [M, V] fp32/fp16/bf16, labels int64 [M] | None ->
    (loss fp32 [M], d loss_i / d student_i [M, V] in student.dtype, or None)."""
    check_labels(labels, student.shape[1], ignore_index)
    grad = torch.empty_like(student) if compute_grad else None
    loss = _launch(
        student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, grad, None
    )
    return loss, grad


def chunk_loss(
    s, t, labels, token_scale, temperature, alpha, divergence, beta, ignore_index, compute_grad
):
    """The per-chunk kernel of the fused-linear chunk loop (qtorch/reference/distillation.py):
    s, t [n, V] fp32 logits -> (loss fp32 [n], s overwritten with token_scale_i · d loss_i / d s_i,
    or None). Labels are checked once by the loop."""
    loss = _launch(
        s,
        t,
        labels,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        s if compute_grad else None,
        token_scale,
    )
    return loss, s if compute_grad else None
