"""MiniLM int4 GPTQ: cosine vs calibration amount (extra sentences from calib_areopagitica.txt)."""

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
from transformers import AutoTokenizer, BertModel

import qtorch

torch.set_num_threads(int(os.environ.get("T", 2)))
path = minilm_path()
tok = AutoTokenizer.from_pretrained(path)
fp32 = BertModel.from_pretrained(path).eval()
batch = tok(Q.eval_sentences(), padding=True, return_tensors="pt")
with torch.no_grad():
    ref = Q.embed(fp32, batch)
base = Q.calibration_sentences()
mil = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
mil = [" ".join(s.split()) for s in re.split(r"(?<=[.!?;])\s+", mil) if 4 <= len(s.split()) <= 60]
print(len(base), "base sentences;", len(mil), "milton sentences")
for spec in sys.argv[1:]:
    n, gs, awq = spec.split(",")  # extra milton sentences, group size, awq
    sents = base + mil[: int(n)]
    cal = [dict(tok(s, return_tensors="pt")) for s in sents]
    ntok = sum(c["input_ids"].numel() for c in cal)
    m = copy.deepcopy(fp32)
    t = time.perf_counter()
    qtorch.quantize_(
        m,
        qtorch.Int4WeightOnlyConfig(int(gs), algorithm="gptq", awq=awq == "1"),
        calibration_data=cal,
    )
    s = time.perf_counter() - t
    with torch.no_grad():
        e = Q.embed(m, batch)
    cos = F.cosine_similarity(e, ref, dim=-1)
    print(
        f"extra {n:>5} ({len(sents)} sentences, {ntok} tokens) g{gs} awq={awq}: cos mean {cos.mean():.4f} min {cos.min():.4f} ({s:.0f} s)",
        flush=True,
    )
