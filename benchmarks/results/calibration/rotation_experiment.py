"""Throwaway: does rotating SmolLM2's residual stream (QuaRot / SpinQuant's R1, folded into the
weights, no online transform) let int4 g32 with integer zero points get near fp32?

    python benchmarks/results/calibration/rotation_experiment.py rtn gptq gptq+awq [r2:gptq ...]

The RMSNorm weights are folded into the linears that read them (then set to 1), and a random
orthogonal Q (QR of a seeded Gaussian, float64) rotates the residual stream: embedding E -> E Q,
q/k/v/gate/up W -> W Q (input side), o/down W -> Q^T W (output side). RMSNorm commutes with Q, so
the float model is unchanged up to rounding (printed). The tied head becomes E diag(g_final) Q, so
this experiment unties it (a product would instead rotate back once before the final norm: one
576x576 product per token). "r2:" also rotates each kv head's V outputs / o_proj inputs by its own
random 64x64 orthogonal matrix. Every linear but lm_head is then quantized with
Int4WeightOnlyConfig(GS, algorithm=..., awq=...) on the rotated weights: the same grid and
kernels. Evaluation: the first 8 x 512 tokens of examples/data/eval_britannica_shakespeare.txt;
calibration: 32 x 512 tokens of examples/data/calib_areopagitica.txt (disjoint), as
gptq_variants.py.
"""

import copy
import math
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../examples"))
import torch
import torch.nn.functional as F
from _common import DATA, smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import qtorch

hf_logging.set_verbosity_error()
gs = int(os.environ.get("GS", 32))
seed = int(os.environ.get("SEED", 0))
d, f = smollm2_gguf()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
fp32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
text = (DATA / "eval_britannica_shakespeare.txt").read_text().split("\n\n", 1)[1]
ids = tok(text, return_tensors="pt").input_ids[:, :4096]
ct = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
cids = tok(ct, return_tensors="pt").input_ids[0]
calib = [cids[None, i * 512 : (i + 1) * 512] for i in range(32)]


@torch.no_grad()
def ppl(m):
    nll = cnt = 0
    for s in range(0, ids.shape[1], 512):
        c = ids[:, s : s + 512]
        o = m(c).logits.float()
        nll += F.cross_entropy(o[0, :-1], c[0, 1:], reduction="sum").item()
        cnt += c.shape[1] - 1
    return math.exp(nll / cnt)


def orth(n, g):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate(model, r2=False):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    inner = m.model
    h = inner.embed_tokens.weight.shape[1]
    q = orth(h, g)

    def set_(lin, w):
        lin.weight = torch.nn.Parameter(w.to(torch.float32), requires_grad=False)

    e = inner.embed_tokens.weight.double()
    head = e * inner.norm.weight.double()
    set_(m.lm_head, head @ q)  # unties: lm_head is no longer the embedding
    inner.embed_tokens.weight = torch.nn.Parameter((e @ q).float(), requires_grad=False)
    inner.norm.weight.fill_(1.0)
    cfg = m.config
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    per = cfg.num_attention_heads // kv
    for layer in inner.layers:
        at, mlp = layer.self_attn, layer.mlp
        g1 = layer.input_layernorm.weight.double()
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            set_(lin, (lin.weight.double() * g1) @ q)
        layer.input_layernorm.weight.fill_(1.0)
        g2 = layer.post_attention_layernorm.weight.double()
        for lin in (mlp.gate_proj, mlp.up_proj):
            set_(lin, (lin.weight.double() * g2) @ q)
        layer.post_attention_layernorm.weight.fill_(1.0)
        wo = at.o_proj.weight.double()
        if r2:
            wv = at.v_proj.weight.double().clone()
            for j in range(kv):
                rj = orth(hd, g)
                wv[j * hd : (j + 1) * hd] = rj.T @ wv[j * hd : (j + 1) * hd]
                for hh in range(j * per, (j + 1) * per):
                    wo[:, hh * hd : (hh + 1) * hd] = wo[:, hh * hd : (hh + 1) * hd] @ rj
            set_(at.v_proj, wv)
        set_(at.o_proj, q.T @ wo)
        set_(mlp.down_proj, q.T @ mlp.down_proj.weight.double())
    return m


ref = ppl(fp32)
print(f"fp32 {ref:.3f}", flush=True)
rots = {}
for v in sys.argv[1:]:
    r2 = v.startswith("r2:")
    algo = v.split(":")[-1]
    if r2 not in rots:
        rots[r2] = rotate(fp32, r2)
        print(f"rotated{' + r2' if r2 else ''} fp32 {ppl(rots[r2]):.3f}", flush=True)
    awq = algo.endswith("+awq")
    algo = algo.removesuffix("+awq")
    m = copy.deepcopy(rots[r2])
    t = time.perf_counter()
    qtorch.quantize_(
        m,
        qtorch.Int4WeightOnlyConfig(gs, algorithm=algo, awq=awq),
        filter_fn=lambda mod, n: n != "lm_head",
        calibration_data=None if algo in ("rtn", "mse") and not awq else calib,
    )
    t = time.perf_counter() - t
    p = ppl(m)
    print(f"{v:24s} g{gs} ppl {p:.3f} ({p / ref - 1:+.2%}) {t:.0f}s", flush=True)
