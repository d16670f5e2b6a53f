"""Backend kernels for the qtorch ops.

Each module here registers, with `qtorch._backend.register_kernel(op, backend)`, the kernels it
has. `qtorch/ops.py` validates arguments, flattens leading dims and makes inputs contiguous,
then calls the kernel chosen by `qtorch._backend.resolve`. So every kernel receives:

    quantize_int8(x [M, K] fp32/fp16/bf16) -> (q int8 [M, K], scale fp32 [M])
    int8_scaled_mm(a int8 [M, K], b int8 [N, K], scale_a fp32 [M], scale_b fp32 [N],
                   bias fp32 [N] | None, out_dtype) -> [M, N] out_dtype
    int8_linear(x [M, K] float, w_q int8 [N, K], w_scale fp32 [N], bias [N] x.dtype | None)
        -> [M, N] x.dtype
    int8_weight_only_linear(x [M, K] float, w_q int8 [N, K], w_scale fp32 [N], bias | None)
        -> [M, N] x.dtype
    quantize_int4(w [N, K] float, group_size: int, symmetric: bool)
        -> (qweight uint8 [N, K//2], scales fp32 [N, K//gs], zeros uint8 [N, K//gs])
    dequantize_int4(qweight, scales, zeros, group_size) -> fp32 [N, K]
    int4_weight_only_linear(x [M, K] float, qweight, scales, zeros, group_size, bias | None)
        -> [M, N] x.dtype
    distillation_loss(student [M, V], teacher [M, V], labels int64 [M] | None,
                      temperature, alpha, divergence ("kl"|"reverse_kl"|"jsd"), beta,
                      ignore_index, compute_grad: bool)
        -> (loss fp32 [M] per token (0 where ignored),
            grad [M, V] student.dtype = d loss[i] / d student[i] (zero rows where ignored), or None)
        Labels outside [0, V) other than ignore_index raise ValueError (checked by the kernel).
    fused_linear_distillation_loss(student_hidden [M, H], student_weight [V, H],
                      teacher_hidden [M, Ht], teacher_weight [V, Ht] or a
                      `qtorch.reference.distillation.ModuleHead` (a quantized teacher head
                      module; teacher_bias is then None), labels [M] | None,
                      student_bias [V] | None, teacher_bias [V] | None,
                      token_scale fp32 [M] | None, chunk_size: int, temperature, alpha,
                      divergence, beta, ignore_index, compute_grad: bool,
                      compute_grad_weight: bool = True)
        -> (loss fp32 [M], grad_hidden [M, H] | None, grad_weight [V, H] | None,
            grad_bias [V] | None); grad_weight is None (its GEMMs skipped) when
        compute_grad_weight is False (a frozen student head)
        grads are of sum_i token_scale[i] * loss[i] (token_scale None means all ones), in the
        dtype of the tensor they belong to, accumulated in fp32; never holds [M, V] at once.
        Every backend's is the one chunk loop, `qtorch.reference.distillation.
        fused_linear_distillation_loss`, given the backend's per-chunk loss kernel (fp32 [n, V]
        logits in; loss out, the gradient written over the student logits where it can) and
        the head class whose GEMMs it runs.

Weights arrive in the canonical layout (API.md); a kernel that wants another layout packs it
per call: an op keeps nothing between calls. The quantized modules own a packed layout
instead, which a backend registers with `qtorch._packed.register_layout` (pack, unpack and the
kernels that run on it; see qtorch/_packed.py).
"""
