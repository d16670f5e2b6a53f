"""Experiment: AWQ-style activation-aware channel scaling (Lin et al. 2023) before GPTQ, on
SmolLM2-135M int4 g32 with integer zeros.

    python benchmarks/results/calibration/awq_gptq_experiment.py [VARIANT ...]
    VARIANT: "awq" (scaling, then RTN), "awq+gptq" (scaling, then GPTQ), "gptq" (no scaling),
             "awq_o+gptq" (also o_proj, scales shared across the query heads of a kv head)

The scaling is an exact re-parametrisation of the float model: for a group of linears reading
the output of an RMSNorm (q/k/v after input_layernorm, gate/up after post_attention_layernorm)
the norm's weight is divided by s and the linears' columns multiplied by s; for down_proj the
rows of up_proj are divided by s (act(gate) * up is linear in up). s = mean|x|^a (normalised
to geometric mean 1) with a picked per group from 0, 0.05, ..., 1 to minimise the RTN output
error tr(dW H dWᵀ), H = XᵀX of the group's input on the calibration text (one float pass).
Same texts as gptq_variants.py: evaluation 8 x 512 tokens of eval_britannica_shakespeare.txt,
calibration 32 x 512 tokens of calib_areopagitica.txt (disjoint).
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
from qtorch.quantizers import mse as M
from qtorch.quantizers.grid import Grid, fake_quant, params_from_range, rtn_range

hf_logging.set_verbosity_error()
torch.set_num_threads(int(os.environ.get("THREADS", 2)))

gs = int(os.environ.get("GS", 32))
grid = Grid("int4", gs)
variants = sys.argv[1:] or ["awq+gptq"]
d, f = smollm2_gguf()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
fp32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
text = (DATA / "eval_britannica_shakespeare.txt").read_text().split("\n\n", 1)[1]
ids = tok(text, return_tensors="pt").input_ids[:, :4096]
ct = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
cids = tok(ct, return_tensors="pt").input_ids[0]
nc = int(os.environ.get("NCAL", 32))
calib = [cids[None, i * 512 : (i + 1) * 512] for i in range(nc)]
ALPHAS = [i / 20 for i in range(21)]
USE_MSE = os.environ.get("SEARCH", "rtn") == "mse"


@torch.no_grad()
def ppl(m):
    nll = cnt = 0
    for s in range(0, ids.shape[1], 512):
        c = ids[:, s : s + 512]
        o = m(c).logits.float()
        nll += F.cross_entropy(o[0, :-1], c[0, 1:], reduction="sum").item()
        cnt += c.shape[1] - 1
    return math.exp(nll / cnt)


def qerr(w, h):
    """tr(dW H dWᵀ) of w's int4 quantization (RTN or MSE ranges)."""
    n, k = w.shape
    if USE_MSE:
        s, z = M.search(grid, w)
    else:
        s, z = params_from_range(grid, *rtn_range(grid, w.reshape(n, k // gs, gs)))
    wq = fake_quant(grid, w.reshape(n, k // gs, gs), s[..., None], z[..., None]).reshape(n, k)
    dw = w - wq
    return ((dw @ h) * dw).sum().item()


def best_scale(ws, h, xabs, tie=None):
    """s minimising the summed output error of the linears ws [N_i, K] (columns scaled by s,
    the input divided by s: H -> H / (s sᵀ))."""
    best = (qerr(torch.cat(ws), h), 0.0, torch.ones_like(xabs))
    for a in ALPHAS[1:]:
        s = xabs.clamp(min=1e-8) ** a
        if tie is not None:
            s = tie(s)
        s = s / torch.exp(torch.log(s).mean())
        e = qerr(torch.cat([w * s for w in ws]), h / s[:, None] / s[None, :])
        if e < best[0]:
            best = (e, a, s)
    return best


@torch.no_grad()
def awq_(model, with_o=False):
    cfg = model.config
    layers = model.model.layers
    stats = {}
    hooks = []

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h, a, n = stats.get(name, (0, 0, 0))
            stats[name] = (h + x.t() @ x, a + x.abs().sum(0), n + x.shape[0])

        return fn

    for i, layer in enumerate(layers):
        at, mlp = layer.self_attn, layer.mlp
        hooks += [at.q_proj.register_forward_pre_hook(hook(f"{i}.qkv"))]
        hooks += [at.o_proj.register_forward_pre_hook(hook(f"{i}.o"))]
        hooks += [mlp.gate_proj.register_forward_pre_hook(hook(f"{i}.gu"))]
        hooks += [mlp.down_proj.register_forward_pre_hook(hook(f"{i}.down"))]
    for c in calib:
        model(c)
    for hk in hooks:
        hk.remove()
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    picked = []
    for i, layer in enumerate(layers):
        at, mlp = layer.self_attn, layer.mlp
        h, a, n = stats[f"{i}.qkv"]
        e, al, s = best_scale([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], h, a / n)
        layer.input_layernorm.weight.div_(s)
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            lin.weight.mul_(s)
        picked.append(al)
        h, a, n = stats[f"{i}.gu"]
        e, al, s = best_scale([mlp.gate_proj.weight, mlp.up_proj.weight], h, a / n)
        layer.post_attention_layernorm.weight.div_(s)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.mul_(s)
        picked.append(al)
        h, a, n = stats[f"{i}.down"]
        e, al, s = best_scale([mlp.down_proj.weight], h, a / n)
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        picked.append(al)
        if with_o:
            h, a, n = stats[f"{i}.o"]

            def tie(s):  # o_proj channel (head j, dim d) <- v channel (kv head j // rep, d)
                return (
                    s.reshape(cfg.num_key_value_heads, rep, hd)
                    .mean(1, keepdim=True)
                    .expand(-1, rep, -1)
                    .reshape(-1)
                )

            e, al, s = best_scale([at.o_proj.weight], h, a / n, tie)
            sv = s.reshape(cfg.num_key_value_heads, rep, hd)[:, 0].reshape(-1)
            at.v_proj.weight.div_(sv[:, None])
            at.o_proj.weight.mul_(s)
            picked.append(al)
    return picked


ref = ppl(fp32)
print(f"fp32 {ref:.3f}", flush=True)
for v in variants:
    m = copy.deepcopy(fp32)
    t = time.perf_counter()
    if v.startswith("awq"):
        picked = awq_(m, with_o=v.startswith("awq_o"))
        print(f"  alphas picked: {picked}", flush=True)
        print(f"  float model after scaling: ppl {ppl(m):.3f}", flush=True)
    algo = "gptq" if v.endswith("gptq") else "rtn"
    qtorch.quantize_(
        m,
        qtorch.Int4WeightOnlyConfig(gs, algorithm=algo),
        filter_fn=lambda mod, n: n != "lm_head",
        calibration_data=calib if algo == "gptq" else None,
    )
    t = time.perf_counter() - t
    p = ppl(m)
    print(
        f"{v:20s} search={'mse' if USE_MSE else 'rtn'} g{gs} ppl {p:.3f} ({p / ref - 1:+.2%}) {t:.0f}s",
        flush=True,
    )
