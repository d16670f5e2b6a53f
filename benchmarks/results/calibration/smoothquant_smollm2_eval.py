# ruff: noqa  (a record of a measurement, kept as it ran; see the README beside it)
"""SmolLM2-135M (Q4_1 GGUF, dequantized to fp32): perplexity of fp32 vs W8A8 RTN vs W8A8
SmoothQuant (several α) and int4 g32 RTN with integer vs float zero points; lm_head float.
Eval: 8 windows x 512 tokens of /usr/share/common-licenses/GPL-3; calibration: disjoint text
(Apache-2.0 + MPL-2.0 licenses), 16 x 512 tokens."""

import copy, math, os, sys, time, warnings

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples")
)
import torch, torch.nn.functional as F
import qtorch
from _common import smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore")
what = sys.argv[1:] or ["w8a8", "int4"]
d, g = smollm2_gguf()
tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
fp32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32).eval()
ev = tok(open("/usr/share/common-licenses/GPL-3").read(), return_tensors="pt").input_ids
ev = ev[:, : 8 * 512].reshape(8, 512)
cal_text = (
    open("/usr/share/common-licenses/Apache-2.0").read()
    + open("/usr/share/common-licenses/MPL-2.0").read()
)
cal = tok(cal_text, return_tensors="pt").input_ids
ncal = min(16, cal.shape[1] // 512)
calib = [cal[:, i * 512 : (i + 1) * 512] for i in range(ncal)]


@torch.no_grad()
def ppl(m):
    nll = n = 0
    for row in ev:
        out = m(row[None]).logits.float()[0, :-1]
        nll += F.cross_entropy(out, row[1:], reduction="sum").item()
        n += row.numel() - 1
    return math.exp(nll / n)


not_head = lambda mod, fqn: fqn != "lm_head"
base = ppl(fp32)
print(
    f"fp32 ppl {base:.4f}  (eval {ev.numel()} tokens GPL-3; calib {ncal}x512 tokens Apache-2.0+MPL-2.0)",
    flush=True,
)


def row(name, m, t):
    p = ppl(m)
    print(f"{name:32s} ppl {p:.4f}  {100 * (p / base - 1):+.2f}%  quantize {t:.1f}s", flush=True)


if "w8a8" in what:
    for a in [None] + [float(v) for v in os.environ.get("ALPHAS", "0.5,0.7").split(",")]:
        m = copy.deepcopy(fp32)
        t = time.time()
        qtorch.quantize_(
            m,
            qtorch.Int8DynamicConfig(smoothquant_alpha=a),
            not_head,
            calibration_data=calib if a is not None else None,
        )
        row(f"W8A8 {'RTN' if a is None else f'SmoothQuant a={a}'}", m, time.time() - t)
if "int4" in what:
    for zp in ["int", "float"]:
        m = copy.deepcopy(fp32)
        t = time.time()
        qtorch.quantize_(m, qtorch.Int4WeightOnlyConfig(group_size=32, zero_point=zp), not_head)
        row(f"int4 g32 RTN zero_point={zp}", m, time.time() - t)
