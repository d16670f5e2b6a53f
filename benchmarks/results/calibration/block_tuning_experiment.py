"""Throwaway: does tuning the int4 codes block by block after GPTQ (AutoRound-style: a learned
rounding offset per weight in [-0.5, 0.5] and a learned factor per group scale, trained by signed
gradient steps on each BERT layer's output error) lift all-MiniLM-L6-v2 past GPTQ?

    python benchmarks/results/calibration/block_tuning_experiment.py 128:0 128:200 32:200

Each SPEC is GROUP:STEPS (STEPS = 0: GPTQ's own codes through the same fake-quant path, a check
that it reproduces GPTQ's cosine). Start: qtorch.quantize_(Int4WeightOnlyConfig(GROUP,
algorithm="gptq")) with the example's 96 calibration sentences; its codes q, scales s and integer
zeros z (the stored grid). Then for each layer in order: inputs = the tuned model's hidden states
before that layer on the calibration sentences, target = the float layer on the same inputs, loss
= mean squared error over real tokens; codes q' = clamp(round(q + v), 0, 15), scales s * a, zeros
unchanged (the same grid and storage: a result a module can hold), v and a trained with
sign(grad) steps of size LR (default 5e-3), mini-batches of 16 sentences. Evaluation: the example's 64
sentences (disjoint), mean cosine of the pooled embeddings against fp32, weights taken from the
fake-quant path (exactly the grid values a module would dequantize).
"""

import copy
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../examples"))
import quantize_minilm as Q
import torch
import torch.nn.functional as F
from _common import DATA, minilm_path
from torch import nn
from transformers import AutoTokenizer, BertModel

import qtorch

torch.set_num_threads(int(os.environ.get("T", 2)))
torch.manual_seed(0)
path = minilm_path()
tok = AutoTokenizer.from_pretrained(path)
fp32 = BertModel.from_pretrained(path).eval()
batch = tok(Q.eval_sentences(), padding=True, return_tensors="pt")
with torch.no_grad():
    ref = Q.embed(fp32, batch)
sents = Q.calibration_sentences()
# NEXTRA: that many more calibration sentences from calib_areopagitica.txt (as
# minilm_calibration_amount.py); TUNE_A=0 keeps the scales fixed (codes only)
mil = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
mil = [" ".join(s.split()) for s in re.split(r"(?<=[.!?;])\s+", mil) if 4 <= len(s.split()) <= 60]
sents = sents + mil[: int(os.environ.get("NEXTRA", 0))]
tune_a = os.environ.get("TUNE_A", "1") == "1"
# INIT=gptq: tune GPTQ's codes; INIT=rtn / mse: AutoRound's own start, the float weight on that
# algorithm's grid (codes round(w / s + z + v), v = 0 is plain RTN / MSE)
init = os.environ.get("INIT", "gptq")
cal = [dict(tok(s, return_tensors="pt")) for s in sents]
cal_b = tok(sents, padding=True, return_tensors="pt")
lr = float(os.environ.get("LR", 5e-3))
mb = 16


def codes(mod):
    c = mod._canonical()
    p = c["qweight"]
    q = torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)
    return q.float(), c["scales"].float(), c["zeros"].float()


class FQ(nn.Module):
    def __init__(self, mod, w=None):
        super().__init__()
        q, s, z = codes(mod)
        if w is not None:  # AutoRound's start: the float weight's position on the grid
            q = w.detach().float() / s.repeat_interleave(mod.group_size, 1)
            q = q + z.repeat_interleave(mod.group_size, 1)
        self.g = mod.group_size
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        self.bias = None if mod.bias is None else mod.bias.detach().clone()
        self.v = nn.Parameter(torch.zeros_like(q))
        self.a = nn.Parameter(torch.ones_like(s))

    def weight(self):
        qv = self.q + self.v
        qr = torch.clamp(qv + (torch.round(qv) - qv).detach(), 0, 15)
        rep = lambda t: t.repeat_interleave(self.g, dim=1)  # noqa: E731
        return (qr - rep(self.z)) * rep(self.s * self.a)

    def forward(self, x):
        return F.linear(x, self.weight(), self.bias)


def swap(model, qmodel):
    qmods = dict(qmodel.named_modules())
    for name, mod in list(model.named_modules()):
        for cn, child in list(mod.named_children()):
            full = f"{name}.{cn}" if name else cn
            if isinstance(child, nn.Linear) and full in qmods:
                setattr(mod, cn, FQ(qmods[full], None if init == "gptq" else child.weight))


def capture(model, i):
    """(hidden_states, kwargs) entering encoder layer i, for the padded calibration batch."""
    got = {}

    def hook(mod, args, kwargs):
        got["x"], got["kw"] = args[0].detach(), kwargs
        raise StopIteration

    h = model.encoder.layer[i].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**cal_b)
    except StopIteration:
        pass
    finally:
        h.remove()
    return got["x"], got["kw"]


def out0(o):
    return o[0] if isinstance(o, tuple) else o


def sub_kw(kw, idx):
    r = {}
    for k, v in kw.items():
        r[k] = v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(sents) else v
    return r


for spec in sys.argv[1:]:
    gs, steps = (int(x) for x in spec.split(":"))
    mq = copy.deepcopy(fp32)
    t = time.perf_counter()
    qtorch.quantize_(
        mq,
        qtorch.Int4WeightOnlyConfig(gs, algorithm=init),
        calibration_data=cal if init == "gptq" else None,
    )
    tg = time.perf_counter() - t
    with torch.no_grad():
        cos_g = F.cosine_similarity(Q.embed(mq, batch), ref, dim=-1).mean().item()
    m = copy.deepcopy(fp32)
    swap(m, mq)
    valid = cal_b["attention_mask"].bool()
    t = time.perf_counter()
    for i in range(len(m.encoder.layer) if steps else 0):
        x, kw = capture(m, i)
        with torch.no_grad():
            y = out0(fp32.encoder.layer[i](x, **kw))
        layer = m.encoder.layer[i]
        tuned = (".v", ".a") if tune_a else (".v",)
        params = [p for n, p in layer.named_parameters() if n.endswith(tuned)]
        first = last = None
        for step in range(steps):
            idx = torch.randperm(len(sents))[:mb]
            o = out0(layer(x[idx], **sub_kw(kw, idx)))
            msk = valid[idx]
            loss = (o - y[idx])[msk].pow(2).mean()
            layer.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p.sub_(lr * p.grad.sign())
                for n, p in layer.named_parameters():
                    if n.endswith(".v"):
                        p.clamp_(-0.5, 0.5)
                    elif n.endswith(".a"):
                        p.clamp_(0.8, 1.2)
            if step == 0:
                first = loss.item()
            last = loss.item()
        with torch.no_grad():
            full = (out0(layer(x, **kw)) - y)[valid].pow(2).mean().item()
        print(
            f"  layer {i}: batch loss {first:.3e} -> {last:.3e}; all tokens {full:.3e}", flush=True
        )
    tt = time.perf_counter() - t
    with torch.no_grad():
        cos = F.cosine_similarity(Q.embed(m, batch), ref, dim=-1)
    print(
        f"g{gs} steps {steps} lr {lr} scales {'tuned' if tune_a else 'fixed'}, {len(sents)} sentences: {init} cos {cos_g:.5f} ({tg:.0f} s); tuned cos mean {cos.mean():.5f}"
        f" min {cos.min():.5f} ({tt:.0f} s)",
        flush=True,
    )
