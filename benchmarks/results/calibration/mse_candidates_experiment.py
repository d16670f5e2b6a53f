"""Throwaway experiment: int4 (integer zeros) MSE range search with more candidates: for each
of RTN's range scaled by p (the library's shrink factors 1.0 .. 0.5, plus expansions 1.025 ..
1.1 unless EXPAND=0), the rounded zero point and its two neighbours (zero +- 1).

    python mse_candidates_experiment.py VARIANT ...   # SmolLM2 through gptq_variants.py (EXT=0: library search)
    python mse_candidates_experiment.py --minilm      # all-MiniLM-L6-v2, algorithm=mse, both searches
"""

import copy
import os
import runpy
import sys

import torch
import torch.nn.functional as F

from qtorch.quantizers import mse as M
from qtorch.quantizers.grid import params_from_range, rtn_range

HERE = os.path.dirname(os.path.abspath(__file__))
P = tuple(1.0 - 0.025 * i for i in range(21))
if os.environ.get("EXPAND", "1") == "1":
    P += (1.025, 1.05, 1.075, 1.1)
library_search = M.search


def extended_search(grid, w, col_weight=None, shrink=M.SHRINK):
    if grid.kind != "int4":
        return library_search(grid, w, col_weight, shrink)
    n, k = w.shape
    gs = grid.group_of(k)
    w = w.float()
    scale = torch.empty(n, k // gs)
    zero = torch.empty_like(scale)
    c = None if col_weight is None else col_weight.float().reshape(1, k // gs, gs)
    rows = max(1, (1 << 20) // (k * len(P) * 3))
    for r0 in range(0, n, rows):
        wg = w[r0 : r0 + rows].reshape(-1, k // gs, gs)
        lo, hi = rtn_range(grid, wg)
        ss, zz = [], []
        for p in P:
            s, z = params_from_range(grid, lo * p, hi * p)
            for dz in (0, -1, 1):
                ss.append(s)
                zz.append((z + dz).clamp(0, 15))
        s, z = torch.stack(ss), torch.stack(zz)
        d = M._sq_error(grid, wg, s[..., None], z[..., None])
        if c is not None:
            d.mul_(c)
        best = d.sum(-1).nan_to_num_(nan=float("inf")).argmin(0, keepdim=True)
        scale[r0 : r0 + rows] = s.gather(0, best)[0]
        zero[r0 : r0 + rows] = z.gather(0, best)[0]
    return scale, zero


def minilm() -> None:
    sys.path.insert(0, os.path.join(HERE, "../../../examples"))
    import quantize_minilm as Q
    from _common import minilm_path
    from transformers import AutoTokenizer, BertModel

    import qtorch

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    fp = BertModel.from_pretrained(path).eval()
    b = tok(Q.eval_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = Q.embed(fp, b)
    for ext in (False, True):
        M.search = extended_search if ext else library_search
        for gs in (128, 32):
            m = copy.deepcopy(fp)
            qtorch.quantize_(m, qtorch.Int4WeightOnlyConfig(gs, algorithm="mse"))
            with torch.no_grad():
                cos = F.cosine_similarity(Q.embed(m, b), ref, dim=-1)
            print(f"minilm mse g{gs} extended={ext}: cos mean {cos.mean():.4f} min {cos.min():.4f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--minilm"]:
        minilm()
    else:
        if os.environ.get("EXT", "1") == "1":
            M.search = extended_search
        sys.argv = ["gptq_variants.py", *sys.argv[1:]]
        runpy.run_path(os.path.join(HERE, "gptq_variants.py"), run_name="__main__")
