"""Weight repacking for the CUDA weight-only kernels (csrc/cuda/weight_only.cu), in plain torch.

Runs on the weight's device: once per module (its packed layout) or per call (an op). Kept apart from
`qtorch.backends.cuda` so it imports (and is tested) without the compiled extension.

Canonical input (API.md): qweight uint8 [N, K/2] (even k in the low nibble), scales fp32
[N, K/gs], zeros uint8 [N, K/gs]. Outputs, with Kp = K rounded up to 64, Np = N rounded up
to 16 (padding holds q = 0, scale = 0, so padded weights dequantize to exactly 0):

    qpacked  int32 [Kp/64, Np/16, 32, 4]
        word ks of lane l, for K chunk c and column block nb, holds 8 nibbles; with
        g = l // 4, t = l % 4, n0 = 16 nb + g, n1 = n0 + 8, k = 64 c + 16 ks + ...:
            nibble 0: q[n0, 2t]   1: q[n0, 2t+8]   2: q[n1, 2t]   3: q[n1, 2t+8]
            nibble 4: q[n0, 2t+1] 5: q[n0, 2t+9]   6: q[n1, 2t+1] 7: q[n1, 2t+9]
        i.e. nibbles (i, i+4) are the two k-adjacent values of one mma.m16n8k16 B register.
    szpacked int32 [Kp/gs, Np]
        low 16 bits: the scale in x's dtype; high 16 bits: MAGIC + zero in x's dtype, where
        MAGIC = 1024 (fp16) or 128 (bf16) is the value the kernel's lop3 trick adds to q.

W8A16 (`pack_int8`): w_q int8 [N, K] -> int32 [Kp/64, Np/16, 2, 32, 4]: lane l's 8 words are
two 16-byte units (unit-major, so a warp's 16-byte shared-memory reads are contiguous); its word
w = 2 ks + h (unit w // 4, slot w % 4) holds, for column n = 16 nb + g + 8 h, the bytes q[n, 2t], q[n, 2t+1], q[n, 2t+8], q[n, 2t+9]
(k relative to 64 c + 16 ks, low byte first), each stored as q + 128 in 0..255 (padding: q = 0).
The per-channel scale stays a separate fp32 [N] vector (applied in the kernel's epilogue).
"""

from __future__ import annotations

import torch

MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}


def _fragment_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dn, dk) int64 [32, 4, 8]: the column/k offset, inside one 64 x 16 (k x n) chunk block,
    of nibble i of word ks of lane l (the table in the module docstring)."""
    lane = torch.arange(32, device=device).view(32, 1, 1)
    ks = torch.arange(4, device=device).view(1, 4, 1)
    i = torch.arange(8, device=device).view(1, 1, 8)
    g, t = lane // 4, lane % 4
    dn = g + 8 * ((i % 4) // 2)
    dk = 16 * ks + 2 * t + (i >= 4).long() + 8 * (i % 2)
    dn, dk = torch.broadcast_tensors(dn, dk)
    return dn, dk


def _byte_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dn, dk) int64 [32, 8, 4]: column/k offset inside a 64 x 16 (k x n) block of byte i of
    word w of lane l for the W8A16 layout (module docstring)."""
    lane = torch.arange(32, device=device).view(32, 1, 1)
    w = torch.arange(8, device=device).view(1, 8, 1)
    i = torch.arange(4, device=device).view(1, 1, 4)
    g, t = lane // 4, lane % 4
    dn = g + 8 * (w % 2)
    dk = 16 * (w // 2) + 2 * t + (i % 2) + 8 * (i // 2)
    dn, dk = torch.broadcast_tensors(dn, dk)
    return dn, dk


def pack_int8(w_q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> the W8A16 kernel's fragment-ordered int32 [Kp/64, Np/16, 2, 32, 4]."""
    n, k = w_q.shape
    kp, np_ = -(-k // 64) * 64, -(-n // 16) * 16
    u = torch.nn.functional.pad(w_q.long(), (0, kp - k, 0, np_ - n)) + 128
    blocks = u.view(np_ // 16, 16, kp // 64, 64).permute(2, 0, 1, 3)
    dn, dk = _byte_index(w_q.device)
    b = blocks[:, :, dn, dk]  # [Kp/64, Np/16, 32, 8, 4]
    shifts = 8 * torch.arange(4, device=w_q.device)
    words = _to_int32((b << shifts).sum(-1))  # [Kp/64, Np/16, 32 lanes, 8 words]
    return words.view(kp // 64, np_ // 16, 32, 2, 4).permute(0, 1, 3, 2, 4).contiguous()


def unpack_int8(qpacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_int8: int8 [N, K], bitwise the weight that was packed."""
    kc, nb = qpacked.shape[0], qpacked.shape[1]
    words = (qpacked.long() & 0xFFFFFFFF).permute(0, 1, 3, 2, 4).reshape(kc, nb, 32, 8)
    b = (words[..., None] >> (8 * torch.arange(4, device=qpacked.device))) & 0xFF
    blocks = torch.empty(kc, nb, 16, 64, dtype=torch.long, device=qpacked.device)
    dn, dk = _byte_index(qpacked.device)
    blocks[:, :, dn, dk] = b
    u = blocks.permute(1, 2, 0, 3).reshape(16 * nb, 64 * kc)
    return (u[:n, :k] - 128).to(torch.int8).contiguous()


def emulate_int8_fragments(qpacked: torch.Tensor) -> torch.Tensor:
    """The integer weights [Np, Kp] the W8A16 kernel's B registers hold, rebuilt from the packed
    words by the mma.m16n8k16 B-fragment layout (b0 = {B[2t][g], B[2t+1][g]}, b1 = {B[2t+8][g],
    B[2t+9][g]}). The kernel's byte -> 16-bit conversion is exact for |q| <= 127 (fp16:
    (1024 + u) - 1152; bf16: via fp32 2^23 + u), so integers are all there is to check."""
    kc, nb = qpacked.shape[0], qpacked.shape[1]
    words = qpacked.long() & 0xFFFFFFFF  # [kc, nb, 2 units, 32 lanes, 4]
    words = words.permute(0, 1, 3, 2, 4).reshape(kc, nb, 32, 8)  # lane l's words 0..7
    w = torch.empty(16 * nb, 64 * kc, dtype=torch.long)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for ks in range(4):
            for h in range(2):  # word 2 ks + h: column n0 (h = 0) or n1 = n0 + 8 (h = 1)
                word = words[:, :, lane, 2 * ks + h]
                for reg, k_off in enumerate((0, 8)):  # b0: k 2t, 2t+1; b1: k 2t+8, 2t+9
                    for half in range(2):
                        u = (word >> (16 * reg + 8 * half)) & 0xFF
                        n = (16 * torch.arange(nb).view(1, nb) + g + 8 * h).expand(kc, nb)
                        k = (
                            64 * torch.arange(kc).view(kc, 1) + 16 * ks + 2 * t + k_off + half
                        ).expand(kc, nb)
                        w[n, k] = u - 128
    return w


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int4 storage -> (qpacked, szpacked) for activations of `dtype` (fp16/bf16)."""
    if dtype not in MAGIC:
        raise TypeError(f"dtype: the CUDA int4 kernel takes float16 or bfloat16, got {dtype}")
    n, k2 = qweight.shape
    k = 2 * k2
    dev = qweight.device
    kp, np_ = -(-k // 64) * 64, -(-n // 16) * 16
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(n, k).long()
    q = torch.nn.functional.pad(q, (0, kp - k, 0, np_ - n))
    # [Kp/64, Np/16, 16 (n in block), 64 (k in chunk)], then gather each lane's nibbles.
    blocks = q.view(np_ // 16, 16, kp // 64, 64).permute(2, 0, 1, 3)
    dn, dk = _fragment_index(dev)
    nib = blocks[:, :, dn, dk]  # [Kp/64, Np/16, 32, 4, 8]
    shifts = 4 * torch.arange(8, device=dev)
    qpacked = _to_int32((nib << shifts).sum(-1)).contiguous()

    groups_p = kp // group_size
    s = torch.zeros(np_, groups_p, dtype=torch.float32, device=dev)
    z = torch.zeros(np_, groups_p, dtype=torch.float32, device=dev)
    s[:n, : scales.shape[1]] = scales.float()
    z[:n, : zeros.shape[1]] = zeros.float()
    s_bits = s.to(dtype).view(torch.int16).long() & 0xFFFF
    zb_bits = (z + MAGIC[dtype]).to(dtype).view(torch.int16).long() & 0xFFFF
    szpacked = _to_int32(s_bits | (zb_bits << 16)).t().contiguous()
    return qpacked, szpacked


def unpack_int4_weight(qpacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The canonical qweight uint8 [N, K/2] back from pack_int4's qpacked (bitwise). The
    scales and zeros are not recoverable from szpacked (it holds them in 16 bits)."""
    kc, nb = qpacked.shape[0], qpacked.shape[1]
    words = qpacked.long() & 0xFFFFFFFF  # [kc, nb, 32, 4]
    nib = (words[..., None] >> (4 * torch.arange(8, device=qpacked.device))) & 0xF
    blocks = torch.empty(kc, nb, 16, 64, dtype=torch.long, device=qpacked.device)
    dn, dk = _fragment_index(qpacked.device)
    blocks[:, :, dn, dk] = nib
    q = blocks.permute(1, 2, 0, 3).reshape(16 * nb, 64 * kc)[:n, :k]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def _bits16(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 holding an unsigned 16-bit pattern -> the `dtype` value with those bits."""
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(dtype)


def emulate_int4_fragments(
    qpacked: torch.Tensor, szpacked: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """What the kernel's registers hold, rebuilt on the CPU from the packed tensors: the
    dequantized weight [Np, Kp] in `dtype`, computed the kernel's way (magic-number nibble
    extraction, (p - (MAGIC + z)) * s in 16-bit arithmetic) and placed where the mma.m16n8k16
    B-fragment layout says each register value belongs (b0 = {B[2t][g], B[2t+1][g]},
    b1 = {B[2t+8][g], B[2t+9][g]}). For tests of the packing without a GPU."""
    kc, nb = qpacked.shape[0], qpacked.shape[1]
    np_, kp = 16 * nb, 64 * kc
    words = qpacked.long() & 0xFFFFFFFF  # [kc, nb, 32, 4]
    magic = MAGIC[dtype]
    w = torch.empty(np_, kp, dtype=dtype)
    sz = szpacked.long() & 0xFFFFFFFF  # [Kp/gs, Np]
    s = _bits16(sz & 0xFFFF, dtype)
    zb = _bits16((sz >> 16) & 0xFFFF, dtype)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for ks in range(4):
            word = words[:, :, lane, ks]  # [kc, nb]
            for pair, (n_off, k_off) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
                # lop3(word >> 4 pair, 0x000f000f, MAGIC): nibbles pair and pair + 4.
                for half in range(2):
                    v = (word >> (4 * pair + 16 * half)) & 0xF
                    p = (v.to(torch.float32) + magic).to(dtype)  # exact: MAGIC | v
                    n = (16 * torch.arange(nb).view(1, nb) + g + n_off).expand(kc, nb)
                    k = 64 * torch.arange(kc).view(kc, 1) + 16 * ks + 2 * t + k_off + half
                    k = k.expand(kc, nb)
                    grp = k // group_size
                    val = (p - zb[grp, n]) * s[grp, n]  # two 16-bit roundings, as __hsub2/__hmul2
                    w[n, k] = val
    return w
