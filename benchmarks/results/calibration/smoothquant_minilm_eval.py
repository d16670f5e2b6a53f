# ruff: noqa  (a record of a measurement, kept as it ran; see the README beside it)
"""all-MiniLM-L6-v2 W8A8: mean embedding cosine vs fp32 on the first 64 sentences of
examples/data/topic_sentences.tsv; SmoothQuant calibrated on the disjoint 32 SENTENCES of
examples/quantize_minilm.py (and the last 32 tsv lines)."""

import copy, os, sys, warnings

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples")
)
import torch, torch.nn.functional as F
import qtorch
from _common import DATA, minilm_path
from quantize_minilm import SENTENCES, embed
from transformers import AutoTokenizer, BertModel

warnings.filterwarnings("ignore")
p = minilm_path()
tok = AutoTokenizer.from_pretrained(p)
fp32 = BertModel.from_pretrained(p).eval()
lines = [
    l.split("\t", 1)[1].strip()
    for l in (DATA / "topic_sentences.tsv").read_text().splitlines()
    if "\t" in l
]
ev = tok(lines[:64], padding=True, return_tensors="pt")
calib = [
    dict(tok(SENTENCES[i : i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)
]
calib += [
    dict(tok(lines[64 + i : 72 + i], padding=True, return_tensors="pt")) for i in range(0, 32, 8)
]
with torch.no_grad():
    ref = embed(fp32, ev)


def cos(m):
    with torch.no_grad():
        e = embed(m, ev)
    c = F.cosine_similarity(e, ref, dim=-1)
    return c.mean().item(), c.min().item()


for a in [None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]:
    m = copy.deepcopy(fp32)
    qtorch.quantize_(
        m,
        qtorch.Int8DynamicConfig(smoothquant_alpha=a),
        calibration_data=calib if a is not None else None,
    )
    mean, worst = cos(m)
    print(
        f"W8A8 {'RTN' if a is None else f'SmoothQuant a={a}':20s} mean cos {mean:.5f}  worst {worst:.5f}",
        flush=True,
    )
