"""SmolLM2-135M int4 GPTQ variants: perplexity and seconds to quantize.

    python benchmarks/results/calibration/gptq_variants.py base "damp=0.1" "use_mse=False" \
        "weighted_mse=True" "zero_point='float'"      [GS=64 for group 64]

Each VARIANT is keyword arguments of qtorch.quantizers.gptq.quantize (or zero_point=, awq=,
algorithm= of the config) applied
to every layer but lm_head. Evaluation: the first 8 x 512 tokens of
examples/data/eval_britannica_shakespeare.txt (EVAL=<file> for another text, NTOK / WIN for
another number of tokens / window length); calibration: 32 x 512 tokens of
examples/data/calib_areopagitica.txt (disjoint; CALIB=<file>, NCAL=<windows>), as
examples/quantize_smollm2.py uses.
"""

import copy
import functools
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
from qtorch.quantizers import awq as A
from qtorch.quantizers import gptq as G

hf_logging.set_verbosity_error()

gs = int(os.environ.get("GS", 32))
variants = sys.argv[1:]
d, f = smollm2_gguf()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
fp32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
eval_name = os.environ.get("EVAL", "brit")
if eval_name == "brit":
    text = (DATA / "eval_britannica_shakespeare.txt").read_text().split("\n\n", 1)[1]
else:
    text = open(eval_name, encoding="utf-8", errors="replace").read()
# NTOK tokens of it (default 4096) scored in windows of WIN (default 512)
ids = tok(text, return_tensors="pt").input_ids[:, : int(os.environ.get("NTOK", 4096))]
win = int(os.environ.get("WIN", 512))
calib_name = os.environ.get("CALIB", "areo")
if calib_name == "areo":
    ct = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
else:
    ct = open(calib_name).read()
cids = tok(ct, return_tensors="pt").input_ids[0]
nc = int(os.environ.get("NCAL", 32))
calib = [cids[None, i * 512 : (i + 1) * 512] for i in range(nc)]


@torch.no_grad()
def ppl(m):
    nll = cnt = 0
    for s in range(0, ids.shape[1], win):
        c = ids[:, s : s + win]
        o = m(c).logits.float()
        nll += F.cross_entropy(o[0, :-1], c[0, 1:], reduction="sum").item()
        cnt += c.shape[1] - 1
    return math.exp(nll / cnt)


ref = ppl(fp32)
print(f"fp32 {ref:.3f}", flush=True)
orig = G.quantize
awq_search = A.search_scale
for v in variants:
    kw = eval(f"dict({v})") if v != "base" else {}
    zp = kw.pop("zero_point", "int")
    awq = kw.pop("awq", False)
    # awq_mse=True / False forces the ranges the AWQ scale search weighs (MSE-searched or
    # RTN's; by default calibrate picks MSE for algorithm mse / gptq, RTN for rtn)
    forced = kw.pop("awq_mse", None)
    A.search_scale = (
        awq_search
        if forced is None
        else lambda *a, use_mse=None, _f=forced, **k: awq_search(*a, use_mse=_f, **k)
    )
    algo = kw.pop("algorithm", "gptq")
    G.quantize = functools.partial(orig, **kw)
    m = copy.deepcopy(fp32)
    t = time.perf_counter()
    qtorch.quantize_(
        m,
        qtorch.Int4WeightOnlyConfig(gs, algorithm=algo, zero_point=zp, awq=awq),
        filter_fn=lambda mod, n: n != "lm_head",
        calibration_data=calib,
    )
    t = time.perf_counter() - t
    p = ppl(m)
    print(f"{v:40s} g{gs} ppl {p:.3f} ({p / ref - 1:+.2%}) {t:.0f}s", flush=True)
