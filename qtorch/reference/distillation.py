"""Distillation loss references (API.md, "Distillation loss semantics").

Per token (row) i, all in float32:

    z = s / T,  u = t / T,   q = softmax(z),  p = softmax(u)
    "kl"          D = KL(p ‖ q) = Σ_j p_j (log p_j − log q_j)
    "reverse_kl"  D = KL(q ‖ p) = Σ_j q_j (log q_j − log p_j)
    "jsd"         D = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),   m = β·p + (1 − β)·q
    loss_i = α · T² · D + (1 − α) · CE(s, label_i)      (CE on the un-tempered student)

A teacher logit of −inf is a masked vocabulary entry: p_j = 0 and every term of entry j is 0.
Any other non-finite logit makes the token's loss non-finite (NaN or ±inf); the gradient of
such a token is not defined (docs/semantics.md).
Ignored tokens (label == ignore_index) give loss 0 and a zero gradient whatever they hold.
The kernels return per-token losses and, when asked, d loss_i / d s_i; `qtorch.ops` reduces.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _token_losses(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
) -> torch.Tensor:
    """Per-token loss [M] from fp32 logits s, t [M, V] (differentiable w.r.t. s)."""
    if labels is not None:
        valid = labels != ignore_index
        # Ignored rows are zeroed so whatever they hold (NaN included) cannot leak.
        s = torch.where(valid[:, None], s, torch.zeros((), dtype=s.dtype, device=s.device))
        t = torch.where(valid[:, None], t, torch.zeros((), dtype=t.dtype, device=t.device))
    else:
        valid = None
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    # Entries the teacher masked with -inf contribute 0 (not 0 * inf = NaN). NaN or +inf
    # teacher logits are not masked, so they still poison the row as they should.
    live = t != float("-inf")
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    p, q = log_p.exp(), log_q.exp()

    def on_live(x):  # masked entries are set to 0 before any product (no 0 · inf anywhere)
        return torch.where(live, x, zero)

    if divergence == "kl":
        d = (p * on_live(log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (q * on_live(log_q - log_p)).sum(-1)
    elif divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        # A term whose weight is 0 is left out, so β ∈ {0, 1} cannot produce 0 · inf.
        d = torch.zeros_like(s[:, 0])
        if beta != 0:
            d = d + beta * (p * on_live(log_p - log_m)).sum(-1)
        if beta != 1:
            d = d + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    loss = alpha * temperature**2 * d

    # API.md: a NaN or +inf logit gives a non-finite loss, never a silent 0, even where the
    # divergence does not read it (jsd with β = 0 never reads p, with β = 1 never q). A -inf
    # logit is a probability of 0, which the formulas handle as they stand.
    def bad(x):
        return ((x != x) | (x == float("inf"))).any(-1)

    poisoned = bad(s) | bad(t)
    loss = torch.where(poisoned & torch.isfinite(loss), float("nan"), loss)
    if labels is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        hard = torch.logsumexp(s, dim=-1) - s.gather(1, safe[:, None]).squeeze(1)
        loss = loss + (1 - alpha) * hard
        loss = torch.where(valid, loss, zero)
    return loss


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m = log(β·p + (1 − β)·q), finite wherever p or q is representable in log space
    (torch.log of the sum would give -inf, and 0 · inf = NaN, where both underflow)."""
    if beta == 1:
        return log_p
    if beta == 0:
        return log_q
    lb = torch.log(torch.tensor(beta, dtype=log_p.dtype, device=log_p.device))
    l1b = torch.log(torch.tensor(1 - beta, dtype=log_p.dtype, device=log_p.device))
    return torch.logaddexp(lb + log_p, l1b + log_q)


def _token_losses_and_grads(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [M] and its gradient d loss_i / d s_i [M, V], in closed form.

    With z = s / T and the softmax Jacobian dq_j/dz_k = q_j (δ_jk − q_k):
        "kl"          dD/dz = q − p
        "reverse_kl"  r = log q − log p on live entries (p > 0);
                      dD/dz_k = [live_k] q_k (r_k + 1) − q_k (D + Σ_live q)   (= q (r − D) unmasked)
        "jsd"         ∂D/∂q_j = (1 − β)(log q_j − log m_j), hence
                      dD/dz = (1 − β) q (log q − log m − KL(q ‖ m))
        soft: d(T² D)/ds = T · dD/dz;   hard: softmax(s) − onehot(label)
    `tests/test_reference.py` checks this against autograd of `_token_losses`.
    """
    loss = _token_losses(s, t, labels, temperature, alpha, divergence, beta, ignore_index)
    if labels is not None:
        valid = labels != ignore_index
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        s = torch.where(valid[:, None], s, zero)
        t = torch.where(valid[:, None], t, zero)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    live = t != float("-inf")
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if divergence == "kl":
        dz = q - p
    elif divergence == "reverse_kl":
        r = torch.where(live, log_q - log_p, zero)
        d = torch.where(live, q * r, zero).sum(-1, keepdim=True)
        q_live = torch.where(live, q, zero).sum(-1, keepdim=True)
        dz = torch.where(live, q * (r + 1), zero) - q * (d + q_live)
    else:
        if beta == 1:
            dz = torch.zeros_like(q)
        else:
            a = log_q - _log_mix(log_p, log_q, beta)
            kl_qm = (q * a).sum(-1, keepdim=True)
            dz = (1 - beta) * q * (a - kl_qm)
    grad = (alpha * temperature) * dz
    if labels is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        hard = torch.softmax(s, dim=-1)
        hard.scatter_add_(1, safe[:, None], -torch.ones_like(hard[:, :1]))
        grad = grad + (1 - alpha) * hard
        grad = torch.where(valid[:, None], grad, zero)
    return loss, grad


def check_labels(labels: torch.Tensor | None, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index are an error (a data-dependent check,
    so it runs in the kernels, not in the fake impl)."""
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: value {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """student, teacher [M, V] -> (loss fp32 [M], d loss_i / d student_i [M, V] in student.dtype
    or None), computed in fp32 (float64 inputs: in float64)."""
    check_labels(labels, student.shape[-1], ignore_index)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(acc), teacher.to(acc)
    args = (labels, temperature, alpha, divergence, beta, ignore_index)
    if not compute_grad:
        return _token_losses(s, t, *args), None
    loss, grad = _token_losses_and_grads(s, t, *args)
    grad = grad.to(student.dtype)
    return loss, grad


def default_chunk_size(num_tokens: int, vocab: int) -> int:
    """Rows per chunk so one [chunk, V] fp32 block of logits is about 32 MiB (2^23 values),
    at least 1 and at most num_tokens.

    Smaller chunks make the two per-chunk matmuls inefficient (at V=32000, 65-row chunks
    spend 80% of the CPU time in small GEMMs); the memory saved stays large: at N=4096,
    V=32000 eager holds ~3.5 GB of logits-sized tensors, a chunk a few times 32 MiB.
    """
    return max(1, min(num_tokens, (8 * 1024 * 1024) // max(vocab, 1)))


def chunk_loss_from(loss_kernel):
    """The per-chunk loss kernel of the chunk loop, made from a kernel with the signature of
    `distillation_loss` (which returns a fresh gradient): (s, t, labels, token_scale, temperature,
    alpha, divergence, beta, ignore_index, compute_grad) -> (loss [n], token_scale_i ·
    d loss_i / d s_i [n, V] or None). Kernels that can write the gradient over s in place
    (cpu, triton) provide their own and return s."""

    def chunk_loss(
        s, t, labels, token_scale, temperature, alpha, divergence, beta, ignore_index, compute_grad
    ):
        loss, g = loss_kernel(
            s, t, labels, temperature, alpha, divergence, beta, ignore_index, compute_grad
        )
        if g is not None and token_scale is not None:
            g.mul_(token_scale[:, None].to(g.dtype))
        return loss, g

    return chunk_loss


reference_chunk_loss = chunk_loss_from(distillation_loss)


def _slice_rows(k: int) -> int:
    """Rows of a weight slice widened to fp32 at a time: about 4 MiB (2^20 values)."""
    return max(1, (1 << 20) // max(k, 1))


class LinearHead:
    """A vocabulary head x @ W.T (+ b) of the chunk loop, its GEMMs in the accumulation dtype
    `acc` (fp32; float64 for float64 inputs): the definition of the logits, and the GEMMs the
    cpu and cuda backends run (BLAS / cuBLAS). Made once per call. Per chunk of n rows:

        operand(h [n, K])              the hidden states as the GEMMs read them
        logits(x, out [n, V] acc)      out = x @ W.T (+ b); returns out
        backward(g [n, V] acc, x, grad_input [n, K] | None, grad_weight [V, K] acc | None)
                                       grad_input = g @ W,  grad_weight += g.T @ x
    (a head with `takes_scratch = True` also gets scratch=, a dead [n, V] acc block (the
    teacher's logits of the chunk, or None) its backward may write over)

    A W already in `acc` is used as it is. A W on the CPU in another dtype (bf16/fp16) is
    never widened whole (an fp32 copy of a [V, K] head would be twice the 16-bit weight, per
    head, at the peak of the loss): each GEMM that reads W walks it in row slices of ~4 MiB,
    widened exactly into one reused fp32 buffer, so every product and sum is the same fp32
    arithmetic as on a widened W. A teacher head needs only `operand` and `logits`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype):
        self.acc = acc
        # CPU only: on a GPU each ~4 MiB slice would be a copy and a GEMM launch of their own
        # (hundreds per chunk at a 128k vocabulary); there the head is widened once.
        self.sliced = weight.dtype != acc and weight.device.type == "cpu"
        self.weight = weight if self.sliced else weight.to(acc)
        self.bias = bias.to(acc) if bias is not None else None
        self._grad_input_acc = None  # [chunk, K] acc, for hidden states not stored in acc
        self._slice = [None]  # flat acc storage of a widened slice, shared by `share_slices`

    def share_slices(self, other: LinearHead) -> None:
        """Widen W slices into `other`'s slice buffer (grown to fit either head): the chunk
        loop uses one head at a time, so the student and teacher heads need only one."""
        self._slice = other._slice

    def _slices(self):
        """(r0, r1, W[r0:r1] in acc) over the rows of W, through one reused buffer."""
        v, k = self.weight.shape
        rows = max(1, min(v, _slice_rows(k)))  # V = 0: no slices, and no zero range step
        flat = self._slice[0]
        if flat is None or flat.numel() < rows * k:
            flat = self._slice[0] = None  # the old one goes first
            flat = self._slice[0] = torch.empty(rows * k, dtype=self.acc, device=self.weight.device)
        buf = flat[: rows * k].view(rows, k)
        for r0 in range(0, v, rows):
            r1 = min(r0 + rows, v)
            yield r0, r1, buf[: r1 - r0].copy_(self.weight[r0:r1])

    def operand(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.acc)

    def logits(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.sliced:
            for r0, r1, w in self._slices():
                torch.mm(x, w.T, out=out[:, r0:r1])
            if self.bias is not None:
                out += self.bias
            return out
        if self.bias is None:
            return torch.mm(x, self.weight.T, out=out)
        return torch.addmm(self.bias, x, self.weight.T, out=out)

    def _grad_input(self, g, out) -> None:
        if not self.sliced:
            torch.mm(g, self.weight, out=out)
            return
        for r0, r1, w in self._slices():
            if r0 == 0:
                torch.mm(g[:, r0:r1], w, out=out)
            else:
                out.addmm_(g[:, r0:r1], w)

    def backward(self, g, x, grad_input, grad_weight) -> None:
        if grad_input is not None:
            if grad_input.dtype == self.acc:
                self._grad_input(g, grad_input)
            else:  # formed in acc, rounded once into the hidden states' dtype
                n = g.shape[0]
                if self._grad_input_acc is None or self._grad_input_acc.shape[0] < n:
                    self._grad_input_acc = g.new_empty((n, self.weight.shape[1]))
                buf = self._grad_input_acc[:n]
                self._grad_input(g, buf)
                grad_input.copy_(buf)
        if grad_weight is not None:
            grad_weight.addmm_(g.T, x)


class ModuleHead:
    """A teacher head that is a function of the hidden states, e.g. a qtorch quantized linear
    module (API.md, "Distillation with a quantized teacher"): each chunk's logits are
    `fn(h_chunk)`, the module's own kernel on the chunk, so its weight is never dequantized in
    full. Only a teacher head can be one (it needs no backward). The logits come out in the
    module's output dtype (h's) and are widened to acc for the loss when they are not already.
    """

    def __init__(self, fn):
        self.fn = fn

    def operand(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def logits(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The module's logits: its own output, widened into `out` when one is given and the
        dtypes differ (the chunk loop passes none and widens to its acc itself)."""
        y = self.fn(x)
        return y if out is None or y.dtype == out.dtype else out.copy_(y)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | ModuleHead,
    labels: torch.Tensor | None,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    token_scale: torch.Tensor | None,
    chunk_size: int,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    compute_grad: bool = True,
    compute_grad_weight: bool = True,
    *,
    chunk_loss=reference_chunk_loss,
    head=LinearHead,
):
    """The distillation loss of s = h_s @ W_s.T (+ b_s) and t = h_t @ W_t.T (+ b_t), chunked
    over tokens so only one [chunk, V] block of logits per head exists at a time.

    This is the one chunk loop of every backend: a backend passes its per-chunk loss kernel
    (`chunk_loss`, see `chunk_loss_from`) and the head class whose GEMMs it runs (`head`, see
    `LinearHead`); the defaults are the reference's. `teacher_weight` may instead be a
    `ModuleHead` (a quantized teacher head; then teacher_bias is None and the module's bias is
    its own). Per chunk of rows [a, b):
        s, t = logits of both heads, in the accumulation dtype (fp32; float64 for float64)
        loss[a:b], g = chunk_loss(s, t, ...)       g = token_scale_i · d loss_i / d s_i,
                                                   written over s where the kernel can
        dh_s[a:b] = g @ W_s,  dW_s += g.T @ h_s,  db_s += Σ_rows g      (acc accumulators)
    so gradients of Σ_i token_scale_i · loss_i come out of the same pass; with
    compute_grad_weight False (a frozen head) the dW_s GEMMs are skipped. `chunk_size` <= 0
    means `default_chunk_size`. Returns (loss [M] in acc, grad_hidden [M, H] | None,
    grad_weight [V, H] | None, grad_bias [V] | None), each grad in the dtype of its tensor.
    Memory beyond inputs and outputs: two [chunk, V] blocks in acc, reused by every chunk, and
    the [V, H] accumulator of the weight gradient; never [M, V].
    """
    m, hidden = student_hidden.shape
    vocab = student_weight.shape[0]
    check_labels(labels, vocab, ignore_index)
    dev = student_hidden.device
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    chunk = chunk_size if chunk_size > 0 else default_chunk_size(m, vocab)
    student = head(student_weight, student_bias, acc)
    if isinstance(teacher_weight, ModuleHead):
        teacher = teacher_weight
    else:
        teacher = head(teacher_weight, teacher_bias, acc)
        if isinstance(teacher, LinearHead) and isinstance(student, LinearHead):
            teacher.share_slices(student)  # one widened-slice buffer for both (4 MiB)
    s_buf = torch.empty((min(chunk, m), vocab), dtype=acc, device=dev)
    # A module teacher returns its own logits tensor per chunk: no buffer is held for it.
    t_buf = None if isinstance(teacher, ModuleHead) else torch.empty_like(s_buf)
    loss = torch.empty(m, dtype=acc, device=dev)
    grad_h = grad_w = grad_b = None
    if compute_grad:
        grad_h = torch.empty_like(student_hidden)
        if compute_grad_weight:
            grad_w = torch.zeros((vocab, hidden), dtype=acc, device=dev)
        if student_bias is not None:
            grad_b = torch.zeros(vocab, dtype=acc, device=dev)
    for start in range(0, m, chunk):
        end = min(start + chunk, m)
        x_s = student.operand(student_hidden[start:end])
        s = student.logits(x_s, s_buf[: end - start])
        t_out = None if t_buf is None else t_buf[: end - start]
        t = teacher.logits(teacher.operand(teacher_hidden[start:end]), t_out)
        t = t if t.dtype == acc else t.to(acc)  # a module teacher's 16-bit or fp32 logits
        lab = labels[start:end] if labels is not None else None
        ts = token_scale[start:end] if token_scale is not None else None
        l_c, g = chunk_loss(
            s, t, lab, ts, temperature, alpha, divergence, beta, ignore_index, compute_grad
        )
        loss[start:end] = l_c
        if compute_grad:
            if getattr(student, "takes_scratch", False):
                # t_out (the teacher's logits block, dead once the loss is formed) is scratch
                # the head's backward may write over.
                student.backward(g, x_s, grad_h[start:end], grad_w, scratch=t_out)
            else:
                student.backward(g, x_s, grad_h[start:end], grad_w)
            if grad_b is not None:
                grad_b += g.sum(0)
        # Nothing of this chunk outlives it: a module teacher's logits are freed before the
        # next chunk's are made, so two of them never coexist.
        s = t = t_out = g = l_c = None
    # The [chunk, V] buffers go before the weight gradient is rounded to its dtype, so the
    # fp32 accumulator and its 16-bit copy do not coexist with them at the peak.
    s_buf = t_buf = student = teacher = x_s = None
    if grad_w is not None:
        grad_w = grad_w.to(student_weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(student_bias.dtype)
    return loss, grad_h, grad_w, grad_b
