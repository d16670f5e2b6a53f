"""Distillation ops: distillation_loss, fused_linear_distillation_loss (definitions:
`qtorch.reference.distillation`). The public functions are made in `qtorch/ops/__init__.py`.

Both public ops are CompositeImplicitAutograd: they check, flatten, call an internal custom op
that returns per-token losses together with the gradient (computed in the same pass over the
logits, as Liger-Kernel does), and reduce. Autograd flows through the internal op, whose
backward only rescales the saved gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch import _backend
from qtorch import _checks as chk
from qtorch.ops._common import _c, _kernel
from qtorch.reference.distillation import ModuleHead, default_chunk_size


def _loss_kernel(op: str, x: Tensor):
    # float64 (gradcheck) runs the reference in float64; kernels take fp32/fp16/bf16. An empty
    # batch (0 tokens) has nothing to compute: the reference gives its empty results (a loss
    # of 0 once reduced) on every backend, whatever a kernel's launch makes of 0 rows.
    if x.dtype == torch.float64 or x.shape[0] == 0:
        return _backend.reference_kernel(op)
    return _kernel(op, x.device)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce(tok: Tensor, valid_count, reduction: str, num_items_in_batch) -> Tensor:
    """Per-token losses [M] -> the reduced loss. Zero counted tokens (or a zero
    num_items_in_batch) give 0 and zero gradients, never NaN."""
    if reduction == "none":
        return tok
    total = tok.sum()
    if reduction == "sum":
        return total
    denom = valid_count if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(device=total.device, dtype=total.dtype)
        safe = torch.where(denom == 0, torch.ones_like(denom), denom)
        return torch.where(denom == 0, torch.zeros_like(total), total / safe)
    return total / denom if denom != 0 else total * 0.0


@torch.library.custom_op("qtorch::_distillation_loss_fwd", mutates_args=())
def _distillation_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """[M, V] logits -> (per-token loss [M], d loss_i / d student_i [M, V] or an empty tensor)."""
    fn = _loss_kernel("distillation_loss", student)
    loss, grad = fn(
        student.contiguous(),
        teacher.contiguous(),
        _c(labels),
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        compute_grad,
    )
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad


@_distillation_loss_fwd.register_fake
def _(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, compute_grad):
    acc = _acc_dtype(student)
    grad_shape = student.shape if compute_grad else (0,)
    return student.new_empty(student.shape[:1], dtype=acc), student.new_empty(grad_shape)


def _distill_setup(ctx, inputs, output):
    # Only the loss carries a gradient; materialized grads would fill a zero [M, V] tensor for
    # the saved-gradient output on every backward (54 ms of a 145 ms backward at 2048 x 32000).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _distill_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:  # the loss is not in the graph that is being differentiated
        return (None,) * 9
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("distillation_loss: backward needs compute_grad=True in forward")
    g = grad * grad_loss[:, None].to(grad.dtype)
    return g, None, None, None, None, None, None, None, None


_distillation_loss_fwd.register_autograd(_distill_backward, setup_context=_distill_setup)


def _labels_flat(labels: Tensor | None) -> Tensor | None:
    return None if labels is None else labels.reshape(-1).to(torch.int64)


def _valid_count(labels: Tensor | None, ignore_index: int, m: int):
    return m if labels is None else (labels != ignore_index).sum()


_DISTILL_SCHEMA_KW = (
    'float temperature=1.0, float alpha=0.5, str divergence="kl", float beta=0.5, '
    'int ignore_index=-100, str reduction="mean"'
)

_lib = torch.library.Library("qtorch", "FRAGMENT")
_lib.define(
    "distillation_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels=None, *, "
    + _DISTILL_SCHEMA_KW
    + ", Tensor? num_items_in_batch=None) -> Tensor"
)
_lib.define(
    "distillation_loss.int_items(Tensor student_logits, Tensor teacher_logits, "
    "Tensor? labels=None, *, " + _DISTILL_SCHEMA_KW + ", int num_items_in_batch) -> Tensor"
)


def _check_distillation(
    student_logits,
    teacher_logits,
    labels,
    temperature,
    alpha,
    divergence,
    beta,
    reduction,
    num_items_in_batch,
) -> None:
    chk.tensor("student_logits", student_logits)
    chk.tensor("teacher_logits", teacher_logits)
    allowed = (*chk.FLOAT_DTYPES, torch.float64)
    chk.dtype_in("student_logits", student_logits, allowed)
    chk.dtype_in("teacher_logits", teacher_logits, allowed)
    chk.min_ndim("student_logits", student_logits, 1)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocab sizes must match: student_logits {tuple(student_logits.shape)}"
            f" vs teacher_logits {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    chk.positive("student_logits.shape[-1] (V)", student_logits.shape[-1])
    chk.loss_labels(labels, student_logits.shape[:-1], "student_logits")
    chk.loss_kwargs(temperature, alpha, divergence, beta, reduction, labels)
    chk.num_items_in_batch(num_items_in_batch)
    chk.same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)


def _distillation_loss_impl(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    alpha=0.5,
    divergence="kl",
    beta=0.5,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
):
    _check_distillation(
        student_logits,
        teacher_logits,
        labels,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        num_items_in_batch,
    )
    lead = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = teacher_logits.reshape(-1, v).to(s.dtype)  # the kernels take one logits dtype
    lab = _labels_flat(labels)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    tok, _ = torch.ops.qtorch._distillation_loss_fwd(
        s,
        t,
        lab,
        float(temperature),
        float(alpha),
        divergence,
        float(beta),
        int(ignore_index),
        compute_grad,
    )
    out = _reduce(tok, _valid_count(lab, ignore_index, s.shape[0]), reduction, num_items_in_batch)
    return out.reshape(lead) if reduction == "none" else out


for _overload in ("distillation_loss", "distillation_loss.int_items"):
    _lib.impl(_overload, _distillation_loss_impl, "CompositeImplicitAutograd")


# ------------------------------------------------------------------ fused linear distillation


def _fused_denominator(labels, ignore_index, m, num_items_t, num_items_i) -> float:
    if num_items_t is not None:
        return float(num_items_t.item())
    if num_items_i >= 0:
        return float(num_items_i)
    return float(m if labels is None else int((labels != ignore_index).sum()))


def _fused_forward(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    reduction,
    num_items_t,
    num_items_i,
    chunk_size,
    compute_grad,
    compute_grad_weight,
):
    """The forward of both routes: the custom op below (teacher_weight a tensor) and
    `_fused_module_fwd` (teacher_weight a `ModuleHead` over a quantized module)."""
    m = student_hidden.shape[0]
    fn = _loss_kernel("fused_linear_distillation_loss", student_hidden)
    token_scale = None
    if reduction == "mean":
        denom = _fused_denominator(labels, ignore_index, m, num_items_t, num_items_i)
        scale = 0.0 if denom == 0 else 1.0 / denom
        token_scale = torch.full(
            (m,), scale, dtype=_acc_dtype(student_hidden), device=student_hidden.device
        )
    compute_grad = compute_grad and reduction != "none"
    tok, gh, gw, gb = fn(
        student_hidden.contiguous(),
        student_weight.contiguous(),
        teacher_hidden.contiguous(),
        _c_weight(teacher_weight),
        _c(labels),
        _c(student_bias),
        _c(teacher_bias),
        token_scale,
        chunk_size,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        compute_grad,
        compute_grad_weight,
    )
    if reduction == "none":
        loss = tok
    elif reduction == "sum":
        loss = tok.sum()
    else:
        loss = (tok * token_scale.to(tok.dtype)).sum()
    return loss, gh, gw, gb


def _c_weight(w):
    return w if isinstance(w, ModuleHead) else w.contiguous()


def _fused_recompute_grads(
    grad_loss,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    chunk_size,
    compute_grad_weight,
):
    """reduction="none" backward of both routes: grads of Σ_i grad_loss[i] · loss_i."""
    fn = _loss_kernel("fused_linear_distillation_loss", student_hidden)
    _, gh, gw, gb = fn(
        student_hidden.contiguous(),
        student_weight.contiguous(),
        teacher_hidden.contiguous(),
        _c_weight(teacher_weight),
        _c(labels),
        _c(student_bias),
        _c(teacher_bias),
        grad_loss.to(_acc_dtype(student_hidden)).contiguous(),
        chunk_size,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        True,
        compute_grad_weight,
    )
    return gh, gw, gb


def _present(like: Tensor, *grads):
    """Absent (None) gradients as empty tensors: a custom op returns tensors only, and its
    outputs must not alias each other (a fresh empty one each)."""
    return tuple(like.new_empty((0,)) if g is None else g for g in grads)


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_fwd", mutates_args=())
def _fused_linear_distillation_loss_fwd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    num_items_t: Tensor | None,
    num_items_i: int,
    chunk_size: int,
    compute_grad: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[M, H] hidden states -> (loss, grad_hidden, grad_weight, grad_bias); the loss is reduced
    ("mean"/"sum": grads of the reduced loss) or per token ("none": no grads here, the backward
    recomputes them weighted by the incoming per-token gradient). Absent grads are empty;
    grad_weight is absent (never computed) when compute_grad_weight is False."""
    loss, gh, gw, gb = _fused_forward(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        reduction,
        num_items_t,
        num_items_i,
        chunk_size,
        compute_grad,
        compute_grad_weight,
    )

    return (loss, *_present(student_hidden, gh, gw, gb))


@_fused_linear_distillation_loss_fwd.register_fake
def _fwd_fake(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    reduction,
    num_items_t,
    num_items_i,
    chunk_size,
    compute_grad,
    compute_grad_weight,
):
    acc = _acc_dtype(student_hidden)
    m = student_hidden.shape[0]
    loss = student_hidden.new_empty((m,) if reduction == "none" else (), dtype=acc)
    grads = compute_grad and reduction != "none"
    gh = student_hidden.new_empty(student_hidden.shape if grads else (0,))
    gw = student_weight.new_empty(student_weight.shape if grads and compute_grad_weight else (0,))
    gb = (
        student_bias.new_empty(student_bias.shape)
        if grads and student_bias is not None
        else student_hidden.new_empty((0,))
    )
    return loss, gh, gw, gb


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_bwd", mutates_args=())
def _fused_linear_distillation_loss_bwd(
    grad_loss: Tensor,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    chunk_size: int,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none" backward: grads of Σ_i grad_loss[i] · loss_i, recomputed chunk by chunk
    (grad_weight empty, never computed, when compute_grad_weight is False)."""
    gh, gw, gb = _fused_recompute_grads(
        grad_loss,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        chunk_size,
        compute_grad_weight,
    )
    return (gh, *_present(student_hidden, gw, gb))


@_fused_linear_distillation_loss_bwd.register_fake
def _bwd_fake(
    grad_loss,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    chunk_size,
    compute_grad_weight,
):
    gb = (
        student_bias.new_empty(student_bias.shape)
        if student_bias is not None
        else student_hidden.new_empty((0,))
    )
    gw = student_weight.new_empty(student_weight.shape if compute_grad_weight else (0,))
    return student_hidden.new_empty(student_hidden.shape), gw, gb


def _fused_setup(ctx, inputs, output):
    (
        sh,
        sw,
        th,
        tw,
        labels,
        sb,
        tb,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        reduction,
        _nt,
        _ni,
        chunk_size,
        _cg,
        grad_weight,
    ) = inputs
    ctx.set_materialize_grads(False)  # no zero tensors for the saved-gradient outputs
    ctx.reduction = reduction
    ctx.has_bias = sb is not None
    ctx.grad_weight = grad_weight
    ctx.tokens = sh.shape[0]  # 0 tokens: empty gradients are the real ones
    if reduction == "none":
        ctx.save_for_backward(sh, sw, th, tw, labels, sb, tb)
        ctx.args = (temperature, alpha, divergence, beta, ignore_index, chunk_size, grad_weight)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _graph_is_kept() -> bool:
    """Whether the running backward keeps its graph (retain_graph / create_graph): then this
    node may run again and must not give away what it saved. True when unknown."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _eager_value(t: Tensor) -> bool:
    """Whether t holds a value that can be read now: a plain tensor outside torch.compile and
    outside any tracing dispatch mode (AOTAutograd, make_fx and opcheck trace the backward
    with fake or functional tensors, whose value is not known)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


def _scaled(grad_loss: Tensor, *grads):
    """The saved gradients of the reduced loss times the incoming gradient. For a unit incoming
    gradient (`loss.backward()`) in eager mode, on a graph that is freed after this backward,
    they are handed over as they are (Liger-Kernel skips the same multiply): `gw * grad_loss`
    would be a second [V, H] weight gradient at the peak of every backward. Autograd may then
    make a saved gradient a parameter's .grad and accumulate into it, so a graph that is kept
    (it can be backpropagated again) always gets fresh products; so do torch.compile (the value
    of grad_loss is not known while tracing, `_eager_value`) and CUDA-graph capture."""
    unit = (
        _eager_value(grad_loss)
        and grad_loss.numel() == 1
        and not (grad_loss.is_cuda and torch.cuda.is_current_stream_capturing())
        and not _graph_is_kept()
        and bool(grad_loss == 1)
    )
    if unit:
        return grads
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


def _fused_backward(ctx, grad_loss, *_):
    if grad_loss is None:  # the loss is not in the graph that is being differentiated
        return (None,) * 18
    if ctx.reduction == "none":
        sh, sw, th, tw, labels, sb, tb = ctx.saved_tensors
        gh, gw, gb = _fused_linear_distillation_loss_bwd(
            grad_loss, sh, sw, th, tw, labels, sb, tb, *ctx.args
        )
    else:
        gh, gw, gb = ctx.saved_tensors
        if gh.numel() == 0 and ctx.tokens != 0 and sum(ctx.needs_input_grad[:2]):
            raise RuntimeError("fused_linear_distillation_loss: forward ran without gradients")
        gh, gw, gb = _scaled(grad_loss, gh, gw, gb)
    gw = gw if ctx.grad_weight else None  # a frozen head: no weight gradient was computed
    gb = gb if ctx.has_bias else None
    return (gh, gw, None, None, None, gb) + (None,) * 12


_fused_linear_distillation_loss_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)

_FUSED_ARGS = (
    "Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor? labels=None, Tensor? student_bias=None, Tensor? teacher_bias=None, "
    "int? chunk_size=None, *, " + _DISTILL_SCHEMA_KW
)
_lib.define(
    "fused_linear_distillation_loss(" + _FUSED_ARGS + ", Tensor? num_items_in_batch=None) -> Tensor"
)
_lib.define(
    "fused_linear_distillation_loss.int_items("
    + _FUSED_ARGS
    + ", int num_items_in_batch) -> Tensor"
)


def _check_fused(
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
    """Argument checks; `tw` is a float tensor [V, Ht] or (the module route) a qtorch quantized
    linear module, whose own bias is the teacher's bias."""
    allowed = (*chk.FLOAT_DTYPES, torch.float64)
    module = tw if isinstance(tw, torch.nn.Module) else None
    named = [("student_hidden", sh), ("student_weight", sw), ("teacher_hidden", th)]
    for name, t in named + ([] if module is not None else [("teacher_weight", tw)]):
        chk.tensor(name, t)
        chk.dtype_in(name, t, allowed)
    chk.min_ndim("student_hidden", sh, 1)
    chk.min_ndim("teacher_hidden", th, 1)
    chk.ndim("student_weight", sw, 2)
    if sh.shape[-1] != sw.shape[1]:
        raise ValueError(
            f"student_hidden [..., H] and student_weight [V, H] must share H, got "
            f"{tuple(sh.shape)} and {tuple(sw.shape)}"
        )
    if module is not None:
        name = type(module).__name__
        if tb is not None:
            raise ValueError(
                f"teacher_bias must be None when teacher_weight is a {name} (the "
                f"module's own bias is the teacher's bias)"
            )
        if th.dtype == torch.float64:
            raise TypeError(
                f"teacher_hidden must be float32, float16 or bfloat16 for a {name} "
                f"teacher head, got {th.dtype}"
            )
        if th.shape[-1] != module.in_features:
            raise ValueError(
                f"teacher_hidden [..., Ht] must have Ht = {name}.in_features = "
                f"{module.in_features}, got {tuple(th.shape)}"
            )
        if sw.shape[0] != module.out_features:
            raise ValueError(
                f"student and teacher vocab sizes must match: student_weight "
                f"{tuple(sw.shape)} vs teacher {name} out_features = "
                f"{module.out_features}"
            )
        if module._device() != th.device:
            raise ValueError(
                f"teacher_weight ({name}) is on {module._device()}, teacher_hidden on {th.device}"
            )
        tw = None
    else:
        chk.ndim("teacher_weight", tw, 2)
        if th.shape[-1] != tw.shape[1]:
            raise ValueError(
                f"teacher_hidden [..., H] and teacher_weight [V, H] must share H, "
                f"got {tuple(th.shape)} and {tuple(tw.shape)}"
            )
        if sw.shape[0] != tw.shape[0]:
            raise ValueError(
                f"student and teacher vocab sizes must match: student_weight "
                f"{tuple(sw.shape)} vs teacher_weight {tuple(tw.shape)}"
            )
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(sh.shape)} and teacher_hidden {tuple(th.shape)} "
            f"must have the same leading (token) dims"
        )
    chk.positive("student_weight.shape[0] (V)", sw.shape[0])
    for name, b in (("student_bias", sb), ("teacher_bias", tb)):
        if b is not None:
            chk.tensor(name, b)
            chk.dtype_in(name, b, allowed)
            chk.shape(name, b, (sw.shape[0],), "[V]")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    chk.loss_labels(labels, sh.shape[:-1], "student_hidden")
    chk.loss_kwargs(temperature, alpha, divergence, beta, reduction, labels)
    chk.num_items_in_batch(num_items_in_batch)
    chk.same_device(
        student_hidden=sh,
        student_weight=sw,
        teacher_hidden=th,
        teacher_weight=tw,
        labels=labels,
        student_bias=sb,
        teacher_bias=tb,
    )


def _fused_prep(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    labels,
    chunk_size,
    num_items_in_batch,
):
    """What both routes of the fused loss (tensor and module teacher) pass the chunk loop:
    rows flattened, the chunk size, the count of items, and whether gradients are wanted."""
    lead = student_hidden.shape[:-1]
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = _labels_flat(labels)
    m, v = sh.shape[0], student_weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(m, v)
    nt = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    ni = num_items_in_batch if isinstance(num_items_in_batch, int) else -1
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    return lead, sh, th, lab, chunk, nt, ni, wants_grad


def _fused_impl(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels=None,
    student_bias=None,
    teacher_bias=None,
    chunk_size=None,
    *,
    temperature=1.0,
    alpha=0.5,
    divergence="kl",
    beta=0.5,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
):
    _check_fused(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        chunk_size,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        num_items_in_batch,
    )
    lead, sh, th, lab, chunk, nt, ni, wants_grad = _fused_prep(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        labels,
        chunk_size,
        num_items_in_batch,
    )
    loss, *_ = torch.ops.qtorch._fused_linear_distillation_loss_fwd(
        sh,
        student_weight,
        th,
        teacher_weight,
        lab,
        student_bias,
        teacher_bias,
        float(temperature),
        float(alpha),
        divergence,
        float(beta),
        int(ignore_index),
        reduction,
        nt,
        ni,
        int(chunk),
        wants_grad,
        wants_grad and student_weight.requires_grad,
    )
    return loss.reshape(lead) if reduction == "none" else loss


for _overload in ("fused_linear_distillation_loss", "fused_linear_distillation_loss.int_items"):
    _lib.impl(_overload, _fused_impl, "CompositeImplicitAutograd")


# ------------------------------------------- the module route: a quantized teacher head (API.md)


def _module_head(kind, tensors, bias, n, k, gs) -> ModuleHead:
    """The teacher head of a quantized module given as its `_forward_spec()` (op arguments):
    each chunk's logits are the module's own kernel on the chunk (qtorch.nn.linear)."""
    from qtorch.nn.linear import run_forward_spec  # (qtorch.nn imports qtorch.ops)

    spec = (kind, list(tensors), bias, n, k, gs)
    return ModuleHead(lambda x: run_forward_spec(spec, x))


# The module route (API.md, "Distillation with a quantized teacher"): the same chunk loop and
# kernels as the ops above with `ModuleHead` as the teacher head. A module is not an op
# argument, so the ops take what its forward runs (`_QuantizedLinear._forward_spec`: a kind,
# its weight tensors, bias, N, K, group size); they are custom ops, so this route traces under
# torch.compile(fullgraph=True) as the tensor route does. The teacher gets no gradient.


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_module_fwd", mutates_args=())
def _fused_module_fwd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_tensors: list[Tensor],
    teacher_bias: Tensor | None,
    teacher_kind: str,
    teacher_n: int,
    teacher_k: int,
    teacher_group_size: int,
    labels: Tensor | None,
    student_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    num_items_t: Tensor | None,
    num_items_i: int,
    chunk_size: int,
    compute_grad: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_fused_linear_distillation_loss_fwd` with a quantized module's teacher head."""
    head = _module_head(
        teacher_kind, teacher_tensors, teacher_bias, teacher_n, teacher_k, teacher_group_size
    )
    loss, gh, gw, gb = _fused_forward(
        student_hidden,
        student_weight,
        teacher_hidden,
        head,
        labels,
        student_bias,
        None,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        reduction,
        num_items_t,
        num_items_i,
        chunk_size,
        compute_grad,
        compute_grad_weight,
    )

    return (loss, *_present(student_hidden, gh, gw, gb))


@_fused_module_fwd.register_fake
def _(sh, sw, th, tt, tb, tkind, tn, tk, tgs, labels, sb, *rest):
    (temperature, alpha, divergence, beta, ii, reduction, nt, ni, chunk, cg, cgw) = rest
    return _fwd_fake(
        sh,
        sw,
        th,
        sw,
        labels,
        sb,
        None,
        temperature,
        alpha,
        divergence,
        beta,
        ii,
        reduction,
        nt,
        ni,
        chunk,
        cg,
        cgw,
    )


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_module_bwd", mutates_args=())
def _fused_module_bwd(
    grad_loss: Tensor,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_tensors: list[Tensor],
    teacher_bias: Tensor | None,
    teacher_kind: str,
    teacher_n: int,
    teacher_k: int,
    teacher_group_size: int,
    labels: Tensor | None,
    student_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    chunk_size: int,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none" backward of the module route (`_fused_linear_distillation_loss_bwd`)."""
    head = _module_head(
        teacher_kind, teacher_tensors, teacher_bias, teacher_n, teacher_k, teacher_group_size
    )
    gh, gw, gb = _fused_recompute_grads(
        grad_loss,
        student_hidden,
        student_weight,
        teacher_hidden,
        head,
        labels,
        student_bias,
        None,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        chunk_size,
        compute_grad_weight,
    )
    return (gh, *_present(student_hidden, gw, gb))


@_fused_module_bwd.register_fake
def _(grad_loss, sh, sw, th, tt, tb, tkind, tn, tk, tgs, labels, sb, *rest):
    (temperature, alpha, divergence, beta, ii, chunk, cgw) = rest
    return _bwd_fake(
        grad_loss,
        sh,
        sw,
        th,
        sw,
        labels,
        sb,
        None,
        temperature,
        alpha,
        divergence,
        beta,
        ii,
        chunk,
        cgw,
    )


def _module_setup(ctx, inputs, output):
    sh, sw, th, tt, tb, tkind, tn, tk, tgs, labels, sb = inputs[:11]
    (temperature, alpha, divergence, beta, ii, reduction, _nt, _ni, chunk, _cg, cgw) = inputs[11:]
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.has_bias = sb is not None
    ctx.grad_weight = cgw
    ctx.tokens = sh.shape[0]
    ctx.n_teacher = len(tt)
    if reduction == "none":
        ctx.save_for_backward(sh, sw, th, labels, sb, tb, *tt)
        ctx.teacher = (tkind, tn, tk, tgs)
        ctx.args = (temperature, alpha, divergence, beta, ii, chunk, cgw)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _module_backward(ctx, grad_loss, *_):
    # one gradient per input (None: none), a list of them for the teacher's tensors
    none = (None, None, None, [None] * ctx.n_teacher) + (None,) * 18
    if grad_loss is None:
        return none
    if ctx.reduction == "none":
        sh, sw, th, labels, sb, tb, *tt = ctx.saved_tensors
        gh, gw, gb = _fused_module_bwd(
            grad_loss, sh, sw, th, tt, tb, *ctx.teacher, labels, sb, *ctx.args
        )
    else:
        gh, gw, gb = ctx.saved_tensors
        if gh.numel() == 0 and ctx.tokens != 0 and sum(ctx.needs_input_grad[:2]):
            raise RuntimeError("fused_linear_distillation_loss: forward ran without gradients")
        gh, gw, gb = _scaled(grad_loss, gh, gw, gb)
    gw = gw if ctx.grad_weight else None
    gb = gb if ctx.has_bias else None
    return (gh, gw) + none[2:10] + (gb,) + none[11:]


_fused_module_fwd.register_autograd(_module_backward, setup_context=_module_setup)


def fused_linear_distillation_loss_module_teacher(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_module,
    labels=None,
    student_bias=None,
    teacher_bias=None,
    chunk_size=None,
    *,
    temperature=1.0,
    alpha=0.5,
    divergence="kl",
    beta=0.5,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
):
    """`qtorch.ops.fused_linear_distillation_loss` when teacher_weight is a quantized module."""
    _check_fused(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_module,
        labels,
        student_bias,
        teacher_bias,
        chunk_size,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        num_items_in_batch,
    )
    lead, sh, th, lab, chunk, nt, ni, wants_grad = _fused_prep(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        labels,
        chunk_size,
        num_items_in_batch,
    )
    th = th.detach()  # the teacher gets no gradient
    args = (
        float(temperature),
        float(alpha),
        divergence,
        float(beta),
        int(ignore_index),
        reduction,
        nt,
        ni,
        int(chunk),
        wants_grad,
        wants_grad and student_weight.requires_grad,
    )
    kind, tensors, bias, n, k, gs = teacher_module._forward_spec()
    loss, *_ = _fused_module_fwd(
        sh, student_weight, th, tensors, bias, kind, n, k, gs, lab, student_bias, *args
    )
    return loss.reshape(lead) if reduction == "none" else loss
