"""Throwaway: what would AWQ give on all-MiniLM-L6-v2 if every layer could take its scale, i.e.
if the W4A16 op divided its input by a per-channel s (as SmoothQuant's W8A8 does) where no
producer can absorb 1/s? BERT is post-LN: the LayerNorm outputs feeding query/key/value and
intermediate.dense also feed the residual, and output.dense reads GELU's output, so today only
attention.output.dense takes its scale (into value's rows).

    python benchmarks/results/calibration/awq_divide_experiment.py 128 32

For each group size: GPTQ, GPTQ + AWQ (the library), and GPTQ + AWQ where a group whose fold is
refused instead keeps its scale with the input divided by s at run time (here a wrapper module
in front of the quantized layer; during calibration the float stand-in holds ŵ/s, the same
product). Evaluation: the example's 64 sentences (mean cosine of pooled embeddings against
fp32), calibration its 96 others (disjoint).
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../examples"))
import quantize_minilm as Q
import torch
import torch.nn.functional as F
from _common import minilm_path
from torch import nn
from transformers import AutoTokenizer, BertModel

import qtorch
import qtorch.calibrate as C

torch.set_num_threads(int(os.environ.get("T", 2)))
path = minilm_path()
tok = AutoTokenizer.from_pretrained(path)
fp32 = BertModel.from_pretrained(path).eval()
batch = tok(Q.eval_sentences(), padding=True, return_tensors="pt")
with torch.no_grad():
    ref = Q.embed(fp32, batch)
cal = [dict(tok(s, return_tensors="pt")) for s in Q.calibration_sentences()]

orig_fold, orig_group = C._Calibration._fold, C._Calibration._quantize_group
divided: dict[str, torch.Tensor] = {}  # layer name -> s
pending = {}


def fold(self, group, s, candidates, run):
    kept = orig_fold(self, group, s, candidates, run)
    if kept is None:
        pending["s"] = s
        return "<divide>"
    return kept


def quantize_group(self, group, h, awq_info=None, run=None):
    pending.clear()
    orig_group(self, group, h, awq_info, run)
    s = pending.pop("s", None)
    if s is not None:
        for lin in group:
            name = self.names[id(lin)][0]
            stand_in = self.model.get_submodule(name)
            stand_in.weight = nn.Parameter(stand_in.weight / s, requires_grad=False)
            divided[name] = s


class Divide(nn.Module):
    def __init__(self, mod, s):
        super().__init__()
        self.mod, self.s = mod, s

    def forward(self, x):
        return self.mod(x / self.s)


def run(gs, awq, divide):
    m = copy.deepcopy(fp32)
    divided.clear()
    if divide:
        C._Calibration._fold, C._Calibration._quantize_group = fold, quantize_group
    try:
        t = time.perf_counter()
        qtorch.quantize_(
            m, qtorch.Int4WeightOnlyConfig(gs, algorithm="gptq", awq=awq), calibration_data=cal
        )
        t = time.perf_counter() - t
    finally:
        C._Calibration._fold, C._Calibration._quantize_group = orig_fold, orig_group
    for name, s in divided.items():
        parent, _, child = name.rpartition(".")
        p = m.get_submodule(parent)
        setattr(p, child, Divide(getattr(p, child), s))
    with torch.no_grad():
        cos = F.cosine_similarity(Q.embed(m, batch), ref, dim=-1)
    label = "gptq" + ("+awq" if awq else "") + ("+divide" if divide else "")
    print(
        f"g{gs} {label:18s} cos mean {cos.mean():.5f} min {cos.min():.5f} ({t:.0f} s;"
        f" {len(divided)} layers divide)",
        flush=True,
    )


for gs in [int(a) for a in sys.argv[1:]]:
    run(gs, False, False)
    run(gs, True, False)
    run(gs, True, True)
