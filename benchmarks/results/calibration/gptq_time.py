"""Seconds to quantize SmolLM2-135M int4 g32 with GPTQ (every layer but lm_head), 32 x 512
calibration tokens of examples/data/calib_areopagitica.txt, one run per memo budget given
(bytes; qtorch.calibrate.MEMO_BYTES, 0 = the memo off), and whether the runs' state dicts are
identical (the memo must change nothing but the work).

    python benchmarks/results/calibration/gptq_time.py 0 1073741824 [...]
"""

import copy
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../examples"))
import torch
from _common import DATA, smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import qtorch
import qtorch.calibrate as C

hf_logging.set_verbosity_error()
d, f = smollm2_gguf()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
fp = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
ct = (DATA / "calib_areopagitica.txt").read_text().split("\n\n", 1)[1]
cids = tok(ct, return_tensors="pt").input_ids[0]
calib = [cids[None, i * 512 : (i + 1) * 512] for i in range(32)]
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
)
sds = []
for budget in [int(x) for x in sys.argv[1:]]:
    C.MEMO_BYTES = budget
    m = copy.deepcopy(fp)
    t = time.perf_counter()
    qtorch.quantize_(
        m,
        qtorch.Int4WeightOnlyConfig(32, algorithm="gptq"),
        filter_fn=lambda mod, n: n != "lm_head",
        calibration_data=calib,
    )
    print(f"memo budget {budget:>11d} bytes: {time.perf_counter() - t:.1f} s", flush=True)
    sds.append(m.state_dict())
    del m
for i in range(1, len(sds)):
    a, b = sds[0], sds[i]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"run {i} state dict identical to run 0: {same}")
