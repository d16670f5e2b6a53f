"""qtorch under `torch.distributed` (API.md, "Distributed").

    fused_linear_distillation_loss(...)   the fused-linear distillation loss with the student and
                                          teacher heads split by vocabulary rows over a group
    ddp_ignore_quantized_buffers(model)   DistributedDataParallel without broadcasting, or
                                          holding, the quantized modules' weight buffers

The vocabulary-parallel loss. Rank r of the group holds rows [lo_r, lo_r + V_r) of both heads
(blocks in rank order, sizes may differ); the hidden states and the labels (global vocabulary
ids) are the same on every rank. Per chunk of tokens each rank computes its block's logits
s_r = h_s W_s,rᵀ (+ b), t_r = h_t W_t,rᵀ (+ b), [chunk, V_r], and three all-reduces over tiny
[chunk, k] tensors give it what the single-process loss (qtorch.reference.distillation) needs
from the other blocks:

    1. MAX   m_z = max_j z_j,  m_u = max_j u_j          (z = s / T, u = t / T, j over all V)
    2. SUM   S_z = Σ_j exp(z_j − m_z),  S_u = Σ_j exp(u_j − m_u),  S_s = Σ_j exp(s_j − T·m_z),
             s_label (only the rank holding the label adds it; the others add 0)
             so  log q_j = (z_j − m_z) − log S_z,  log p_j = (u_j − m_u) − log S_u  exactly, on
             every rank's own columns, and logsumexp(s) = T·m_z + log S_s.
    3. SUM   the divergence's per-token sums, each term of which needs only column j:
             kl          Σ_live p (log p − log q)
             reverse_kl  Σ_live q (log q − log p),  Σ_live q          (the latter for the gradient)
             jsd         Σ_live p (log p − log m),  Σ q (log q − log m),
                         log m_j = logaddexp(log β + log p_j, log(1 − β) + log q_j)
             ("live": the teacher logit is not −inf, as in the reference)

Then the token loss is the reference's, α T² D + (1 − α)(logsumexp(s) − s_label), and the
gradient of the loss w.r.t. the rank's own logits, g_r [chunk, V_r], is the reference's closed
form on those columns (it needs only column j and the per-token scalars D, Σ_live q, KL(q ‖ m)
that round 3 summed). The student gradients follow without further communication except one:

    dW_s,r = Σ_chunks g_rᵀ h_s     (the rows lo_r .. lo_r + V_r of the single-process dW_s)
    db_s,r = Σ_rows g_r
    dh_s   = Σ_r g_r W_s,r          (one SUM all-reduce of [M, H] after the last chunk)

As in the single-process op, "mean" and "sum" compute every gradient during the forward pass,
chunk by chunk; "none" returns per-token losses and recomputes the chunks in its backward,
weighted by the incoming per-token gradient (which every rank must pass alike). No rank holds
more than [chunk, V_r] of logits; the chunk is the single-process default for the whole
vocabulary, so each rank's blocks shrink as the group grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtorch import _checks as chk
from qtorch.nn.linear import _QuantizedLinear
from qtorch.reference.distillation import (
    DIVERGENCES,
    _log_mix,
    check_labels,
    default_chunk_size,
)

__all__ = ["fused_linear_distillation_loss", "ddp_ignore_quantized_buffers"]

_NAME = "qtorch.distributed.fused_linear_distillation_loss"


@dataclass
class _Plan:
    """Everything a call needs besides the differentiable tensors."""

    group: object  # None for a group of one
    lo: int  # this rank's first vocabulary row
    rows: int  # V_r
    chunk: int
    labels: Tensor | None  # [M] int64 global ids
    teacher_module: nn.Module | None
    temperature: float
    alpha: float
    divergence: str
    beta: float
    ignore_index: int
    reduction: str
    scale: float  # "mean": 1 / denominator (0 when it is 0); "sum": 1
    grad_h: bool
    grad_w: bool
    grad_b: bool


def _all_reduce(x: Tensor, op, group) -> Tensor:
    if group is not None:  # None: a group of one, nothing to combine
        dist.all_reduce(x, op=op, group=group)
    return x


def _row_max(x: Tensor) -> Tensor:
    """max over the last dim, -inf for a rank holding no rows (an empty block)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("-inf"))
    return x.amax(-1)


def _chunk_loss(logits, lab: Tensor | None, p: _Plan, want_grad: bool):
    """One chunk -> (token losses [c], d loss_i / d s [c, V_r] or None). `logits()` makes this
    rank's fresh logit blocks s, t [c, V_r] (fp32/fp64); nothing else holds them, and the
    chunk's memory is a few such blocks, so each block is turned into the next quantity in
    place as soon as the one it holds is dead. Collective: every rank of the group calls it
    alike."""
    temp, alpha, beta, div = p.temperature, p.alpha, p.beta, p.divergence
    group, sum_, max_ = p.group, dist.ReduceOp.SUM, dist.ReduceOp.MAX
    s, t = logits()
    zero = s.new_zeros(())
    valid = None
    if lab is not None:
        valid = lab != p.ignore_index
        # Ignored rows are zeroed so whatever they hold (NaN included) cannot leak.
        s.masked_fill_(~valid[:, None], 0)
        t.masked_fill_(~valid[:, None], 0)
    # Entries the teacher masked with -inf have p = 0 and contribute 0 (not 0 · inf = NaN);
    # NaN or +inf teacher logits are not masked, so they still poison the row as they should.
    dead = t == float("-inf")
    z = s / temp if temp != 1 else s  # (when T != 1, s itself is kept for the CE)
    if temp != 1:
        t.div_(temp)  # u = t / T

    # 1. the maxima over the whole vocabulary
    mx = _all_reduce(torch.stack((_row_max(z), _row_max(t)), 1), max_, group)
    if valid is not None:  # the label's logit, from the rank that holds it
        own = valid & (lab >= p.lo) & (lab < p.lo + p.rows)
        col = torch.where(own, lab - p.lo, torch.zeros_like(lab))
        s_lab = s.gather(1, col[:, None]).squeeze(1) if p.rows else s.new_zeros(s.shape[0])
    log_q = z.sub_(mx[:, :1])  # z − m_z, log q once round 2 has S_z (in s itself when T = 1)
    log_p = t.sub_(mx[:, 1:])
    del z, t
    # 2. the sums of exp below the maxima, and the label's logit
    parts = [log_q.exp().sum(1), log_p.exp().sum(1)]
    if valid is not None:
        if temp != 1:  # logsumexp(s) needs its own sum; T·m_z is within rounding of max s
            parts.append((s - temp * mx[:, :1]).exp_().sum(1))
        parts.append(torch.where(own, s_lab, zero))
    sums = _all_reduce(torch.stack(parts, 1), sum_, group)
    log_q.sub_(sums[:, :1].log())
    log_p.sub_(sums[:, 1:2].log())

    # 3. the divergence's sums over the whole vocabulary; q and p replace log q and log p
    if div == "kl":
        r = (log_p - log_q).masked_fill_(dead, 0)  # log p − log q on live entries
        q, pt = log_q.exp_(), log_p.exp_()
        parts = [r.mul_(pt).sum(1)]
        del r
    elif div == "reverse_kl":
        r = (log_q - log_p).masked_fill_(dead, 0)  # log q − log p on live entries (kept: dD/dz)
        del log_p  # (p is not needed)
        q = log_q.exp_()
        parts = [(q * r).sum(1), q.masked_fill(dead, 0).sum(1)]
    else:
        # (log m is log p itself when β = 1 and log q when β = 0; it is not used after a, b)
        log_m = _log_mix(log_p, log_q, beta)
        parts = []
        if beta != 0:  # a term whose weight is 0 is left out: no 0 · inf for β ∈ {0, 1}
            b = (log_p - log_m).masked_fill_(dead, 0)
            parts.append(b.mul_(log_p.exp_()).sum(1))
            del b
        if beta != 1:
            a = log_q - log_m  # log q − log m (kept: dD/dz)
        del log_m, log_p
        q = log_q.exp_()
        if beta != 1:
            parts.append((q * a).sum(1))
    del log_q
    red = _all_reduce(torch.stack(parts, 1), sum_, group)
    if div == "jsd":
        d = torch.zeros_like(red[:, 0])
        if beta != 0:
            d = d + beta * red[:, 0]
        if beta != 1:
            kl_qm = red[:, -1:]
            d = d + (1 - beta) * kl_qm[:, 0]
    else:
        d = red[:, 0]
    loss = alpha * temp**2 * d
    if valid is not None:
        lse_s = (mx[:, 0] + sums[:, 0].log()) if temp == 1 else (temp * mx[:, 0] + sums[:, 2].log())
        loss = loss + (1 - alpha) * (lse_s - sums[:, -1])
        loss = torch.where(valid, loss, zero)
    if not want_grad:
        return loss, None

    # d loss_i / d s on this rank's columns (the reference's closed form, z = s / T):
    #   kl          dD/dz = q − p
    #   reverse_kl  dD/dz = [live] q (r + 1) − q (D + Σ_live q),   r = log q − log p on live
    #   jsd         dD/dz = (1 − β) q (log q − log m − KL(q ‖ m))
    #   soft: d(T² D)/ds = T dD/dz;   hard: softmax(s) − onehot(label)
    if div == "kl":
        g = q - pt
        del pt
    elif div == "reverse_kl":
        g = r.add_(1).mul_(q).masked_fill_(dead, 0).sub_(q * (red[:, :1] + red[:, 1:2]))
        del r
    elif beta == 1:
        g = torch.zeros_like(q)
    else:
        g = a.sub_(kl_qm).mul_(q).mul_(1 - beta)
        del a
    g.mul_(alpha * temp)
    if valid is not None:
        # softmax(s): q itself when T = 1, else exp(s − logsumexp(s)) in s's place
        g.add_(q if temp == 1 else s.sub_(lse_s[:, None]).exp_(), alpha=1 - alpha)
        if p.rows:
            g.scatter_add_(1, col[:, None], own[:, None].to(g.dtype) * -(1 - alpha))
        g.masked_fill_(~valid[:, None], 0)
    return loss, g


def _chunk_loop(sh, sw, sb, th, tw, tb, p: _Plan, token_scale: Tensor | None, want_grad: bool):
    """The chunks over all M tokens -> (token losses [M] acc, grad_h, grad_w, grad_b | None).
    Gradients are of Σ_i c_i loss_i, c = token_scale [M] or p.scale; grad_h is all-reduced."""
    m, acc = sh.shape[0], (torch.float64 if sh.dtype == torch.float64 else torch.float32)
    dev = sh.device
    w_s = sw.to(acc)
    b_s = None if sb is None else sb.to(acc)
    if p.teacher_module is None:
        w_t = tw.to(acc)
        b_t = None if tb is None else tb.to(acc)
    loss = torch.empty(m, dtype=acc, device=dev)
    gh = gw = gb = None
    need_h, need_w, need_b = (
        want_grad and p.grad_h,
        want_grad and p.grad_w,
        want_grad and p.grad_b,
    )
    if need_h:
        gh = torch.zeros(sh.shape, dtype=acc, device=dev)
    if need_w:
        gw = torch.zeros(w_s.shape, dtype=acc, device=dev)
    if need_b:
        gb = torch.zeros(p.rows, dtype=acc, device=dev)
    for a in range(0, m, p.chunk):
        e = min(a + p.chunk, m)
        h = sh[a:e].to(acc)

        def logits(a=a, e=e, h=h):  # (made inside _chunk_loss, so that it alone holds them)
            s = h @ w_s.T
            if b_s is not None:
                s += b_s
            if p.teacher_module is None:
                t = th[a:e].to(acc) @ w_t.T
                if b_t is not None:
                    t += b_t
            else:  # a quantized head: its own output on the chunk (its bias included)
                t = p.teacher_module(th[a:e]).to(acc)
            return s, t

        lab = None if p.labels is None else p.labels[a:e]
        tok, g = _chunk_loss(logits, lab, p, want_grad)
        loss[a:e] = tok
        if g is None:
            continue
        g.mul_(token_scale[a:e, None].to(acc) if token_scale is not None else p.scale)
        if need_h:
            gh[a:e] = g @ w_s
        if need_w:
            gw.addmm_(g.T, h)
        if need_b:
            gb += g.sum(0)
        del g  # before the next chunk's blocks exist
    if need_h:
        _all_reduce(gh, dist.ReduceOp.SUM, p.group)  # dh = Σ_r g_r W_s,r
        gh = gh.to(sh.dtype)
    if need_w:
        gw = gw.to(sw.dtype)
    if need_b:
        gb = gb.to(sb.dtype)
    return loss, gh, gw, gb


class _VocabParallelLoss(torch.autograd.Function):
    """(student_hidden [M, H], student_weight_shard, student_bias_shard, teacher_hidden,
    teacher_weight_shard, teacher_bias_shard) -> the reduced loss, or per-token [M] losses."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, p: _Plan):
        ctx.plan = p
        want = p.reduction != "none" and (p.grad_h or p.grad_w or p.grad_b)
        tok, gh, gw, gb = _chunk_loop(sh, sw, sb, th, tw, tb, p, None, want)
        if p.reduction == "none":
            ctx.save_for_backward(sh, sw, sb, th, tw, tb)
            return tok
        ctx.save_for_backward(gh, gw, gb)
        return tok.sum() if p.reduction == "sum" else (tok * p.scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        p: _Plan = ctx.plan
        if p.reduction == "none":
            sh, sw, sb, th, tw, tb = ctx.saved_tensors
            with torch.no_grad():
                _, gh, gw, gb = _chunk_loop(sh, sw, sb, th, tw, tb, p, grad_out, True)
        else:
            gh, gw, gb = ctx.saved_tensors
            gh = None if gh is None else gh * grad_out.to(gh.dtype)
            gw = None if gw is None else gw * grad_out.to(gw.dtype)
            gb = None if gb is None else gb * grad_out.to(gb.dtype)
        return gh, gw, gb, None, None, None, None


# ------------------------------------------------------------------------- argument checks

_ALLOWED = (*chk.FLOAT_DTYPES, torch.float64)
# Fields every rank must agree on (gathered once per call, with each rank's block size).
_META = (
    "ok",
    "rows",
    "tokens",
    "H",
    "Ht",
    "chunk_size",
    "labels",
    "student_bias",
    "teacher_bias",
    "grad_hidden",
    "temperature",
    "alpha",
    "divergence",
    "beta",
    "ignore_index",
    "reduction",
    "denominator",
)


def _check_local(
    sh,
    sw,
    th,
    tw,
    labels,
    sb,
    tb,
    chunk_size,
    temperature,
    alpha,
    divergence,
    beta,
    reduction,
    num_items_in_batch,
) -> None:
    """The single-process op's checks, per shard (block sizes may differ by rank)."""
    module = isinstance(tw, nn.Module)
    for name, t in (
        ("student_hidden", sh),
        ("student_weight_shard", sw),
        ("teacher_hidden", th),
    ) + (() if module else (("teacher_weight_shard", tw),)):
        chk.tensor(name, t)
        chk.dtype_in(name, t, _ALLOWED)
    chk.min_ndim("student_hidden", sh, 1)
    chk.min_ndim("teacher_hidden", th, 1)
    chk.ndim("student_weight_shard", sw, 2)
    if sh.shape[-1] != sw.shape[1]:
        raise ValueError(
            f"student_hidden [..., H] and student_weight_shard [V_r, H] must share "
            f"H, got {tuple(sh.shape)} and {tuple(sw.shape)}"
        )
    if module:
        if not isinstance(tw, _QuantizedLinear):
            raise TypeError(
                f"teacher_weight_shard must be a Tensor or a qtorch quantized linear "
                f"module, got {type(tw).__name__}"
            )
        if tb is not None:
            raise ValueError(
                "teacher_bias_shard must be None when teacher_weight_shard is a "
                "module (the module's own bias is used)"
            )
        t_rows, t_in = tw.out_features, tw.in_features
        shown = f"{type(tw).__name__}(in_features={t_in}, out_features={t_rows})"
    else:
        chk.ndim("teacher_weight_shard", tw, 2)
        t_rows, t_in = tw.shape
        shown = str(tuple(tw.shape))
    if th.shape[-1] != t_in:
        raise ValueError(
            f"teacher_hidden [..., Ht] and teacher_weight_shard [V_r, Ht] must share "
            f"Ht, got {tuple(th.shape)} and {shown}"
        )
    if sw.shape[0] != t_rows:
        raise ValueError(
            f"student and teacher shards must hold the same vocabulary rows: "
            f"student_weight_shard {tuple(sw.shape)} vs teacher_weight_shard {shown}"
        )
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(sh.shape)} and teacher_hidden {tuple(th.shape)} "
            f"must have the same leading (token) dims"
        )
    for name, b in (("student_bias_shard", sb), ("teacher_bias_shard", tb)):
        if b is not None:
            chk.tensor(name, b)
            chk.dtype_in(name, b, _ALLOWED)
            chk.shape(name, b, (sw.shape[0],), "[V_r]")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    chk.loss_labels(labels, sh.shape[:-1], "student_hidden")
    chk.loss_kwargs(temperature, alpha, divergence, beta, reduction, labels)
    chk.num_items_in_batch(num_items_in_batch)
    chk.same_device(
        student_hidden=sh,
        student_weight_shard=sw,
        teacher_hidden=th,
        teacher_weight_shard=None if module else tw,
        labels=labels,
        student_bias_shard=sb,
        teacher_bias_shard=tb,
    )


def _gather_meta(values: list[float], device, group, world: int) -> Tensor:
    """[world, len(values)] float64: every rank's values, in group rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if world == 1:
        return mine[None].cpu()
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor | nn.Module,
    labels: Tensor | None = None,
    student_bias_shard: Tensor | None = None,
    teacher_bias_shard: Tensor | None = None,
    *,
    group=None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """The fused-linear distillation loss with both heads split by vocabulary rows over `group`
    (default: the world). Collective: every rank of the group calls it with the same
    student_hidden [..., H], teacher_hidden [..., Ht], labels [...] (global ids) and keywords,
    and its own shards: student_weight_shard [V_r, H], teacher_weight_shard [V_r, Ht] (or a
    qtorch quantized linear module of in_features Ht, out_features V_r, whose output on each
    chunk is the teacher's logits), biases [V_r]; rank r's rows come after those of ranks < r.

    Returns on every rank what `qtorch.ops.fused_linear_distillation_loss` returns on the
    concatenated heads (float32 scalar, or [...] with reduction="none"); differentiable w.r.t.
    student_hidden (the full gradient: the shards' contributions are all-reduced),
    student_weight_shard and student_bias_shard (this rank's rows of the full gradient). A
    frozen head (requires_grad False) gets no weight gradient computed. The gradient that
    reaches the loss must be the same on every rank (it is when every rank computes the same
    thing from the loss), and with reduction="none" every rank must run the backward (it
    recomputes the chunks, collectively). chunk_size None: the single-process default for the
    whole vocabulary (`qtorch.reference.distillation.default_chunk_size`), the same on every
    rank. Errors on any rank raise on every rank (no rank is left waiting in a collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_NAME} needs torch.distributed initialized (init_process_group)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{_NAME}: this process is not a member of `group`")
    world = dist.get_world_size(group)
    sh, sw, th, tw = student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard
    sb, tb = student_bias_shard, teacher_bias_shard
    error = None
    try:
        _check_local(
            sh,
            sw,
            th,
            tw,
            labels,
            sb,
            tb,
            chunk_size,
            temperature,
            alpha,
            divergence,
            beta,
            reduction,
            num_items_in_batch,
        )
    except (TypeError, ValueError) as e:
        error = e
    module = tw if isinstance(tw, nn.Module) else None
    wants = torch.is_grad_enabled()
    grad_h = bool(wants and isinstance(sh, Tensor) and sh.requires_grad)
    grad_w = bool(wants and isinstance(sw, Tensor) and sw.requires_grad)
    grad_b = bool(wants and isinstance(sb, Tensor) and sb.requires_grad)
    device = sh.device if isinstance(sh, Tensor) else torch.device("cpu")
    if error is None:
        lab = None if labels is None else labels.reshape(-1).to(torch.int64)
        m = math.prod(sh.shape[:-1])
        if reduction != "mean":
            denom = 0.0
        elif num_items_in_batch is None:
            denom = float(m if lab is None else int((lab != ignore_index).sum()))
        elif isinstance(num_items_in_batch, Tensor):
            denom = float(num_items_in_batch.item())
        else:
            denom = float(num_items_in_batch)
        values = [
            1,
            sw.shape[0],
            m,
            sh.shape[-1],
            th.shape[-1],
            chunk_size or -1,
            labels is not None,
            sb is not None,
            tb is not None,
            grad_h,
            float(temperature),
            float(alpha),
            DIVERGENCES.index(divergence),
            float(beta),
            ignore_index,
            chk.REDUCTIONS.index(reduction),
            denom,
        ]
    else:
        values = [0] + [0] * (len(_META) - 1)
    meta = _gather_meta([float(v) for v in values], device, group, world)
    bad = [r for r in range(world) if meta[r, 0] != 1]
    if error is not None:
        raise error
    if bad:
        raise RuntimeError(
            f"{_NAME}: the arguments of group rank(s) {bad} are invalid (their "
            f"error says why); no rank computed the loss"
        )
    for i, name in enumerate(_META[2:], start=2):
        col = meta[:, i]
        if bool((col != col[0]).any()):
            raise ValueError(
                f"{_NAME}: {name} must be the same on every rank of the group, got "
                f"{col.tolist()} (group rank order)"
            )
    rows = [int(v) for v in meta[:, 1].tolist()]
    vocab = sum(rows)
    chk.positive("the vocabulary size (the shards' rows over the group)", vocab)
    check_labels(lab, vocab, ignore_index)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(m, vocab)
    scale = 1.0 if reduction != "mean" else 0.0 if denom == 0 else 1.0 / denom
    plan = _Plan(
        group=group if world > 1 else None,
        lo=sum(rows[:rank]),
        rows=rows[rank],
        chunk=int(chunk),
        labels=lab,
        teacher_module=module,
        temperature=float(temperature),
        alpha=float(alpha),
        divergence=divergence,
        beta=float(beta),
        ignore_index=int(ignore_index),
        reduction=reduction,
        scale=scale,
        grad_h=grad_h,
        grad_w=grad_w,
        grad_b=grad_b,
    )
    lead = sh.shape[:-1]
    out = _VocabParallelLoss.apply(
        sh.reshape(m, sh.shape[-1]),
        sw,
        sb,
        th.reshape(m, th.shape[-1]),
        None if module else tw,
        None if module else tb,
        plan,
    )
    return out.reshape(lead) if reduction == "none" else out


# --------------------------------------------------------------------------- data parallel


def _quantized_modules(model: nn.Module):
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, _QuantizedLinear)]


def ddp_ignore_quantized_buffers(model: nn.Module, group=None) -> nn.Module:
    """Let `torch.nn.parallel.DistributedDataParallel(model)` leave every qtorch quantized
    module's weight buffers (canonical and packed) alone; call it before wrapping. Returns
    `model`.

    DDP would otherwise broadcast every buffer from rank 0, at construction and before every
    forward, pairing the ranks' buffers by position: a module holds either its canonical
    buffers or its packed layout, so where the ranks' modules are in different states (one
    rank called `state_dict()`, which unpacks) rank 0's canonical bytes land in the others'
    packed buffers, silently wrong weights. Where the states agree it sends the whole frozen
    backbone every step, and it keeps references to the buffers between steps, so that a
    module which unpacked for a `state_dict()` sees its canonical buffers shared and never
    packs again (it then repacks on every call). Quantization is deterministic and the buffers
    are frozen, so
    they need no synchronisation while training; to keep DDP's guarantee that every rank starts
    from rank 0's weights, this broadcasts them once, in their canonical layout (the same on
    every rank, whatever layout each rank packed), from rank 0 of `group` (default: the world)
    when torch.distributed is initialized. Collective then: every rank of the group calls it.
    """
    names = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    mods = _quantized_modules(model)
    for prefix, mod in mods:
        names += [f"{prefix}.{b}" if prefix else b for b in mod._buffers]
    if dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD if group is None else group
        if dist.get_world_size(group) > 1:
            src = dist.get_global_rank(group, 0)
            for _, mod in mods:
                _broadcast_canonical(mod, src, group)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, names
    )
    return model


def _broadcast_canonical(mod: _QuantizedLinear, src: int, group) -> None:
    # Each buffer goes through a copy: a collective's work object may outlive the call by a
    # little and hold its tensor, and the module packs only when nothing else holds them.
    mod._unpack()
    for name in sorted(n for n, t in mod._buffers.items() if t is not None):
        tmp = mod._buffers[name].clone()
        dist.broadcast(tmp, src=src, group=group)
        mod._buffers[name].copy_(tmp)
        del tmp
    mod._pack()
