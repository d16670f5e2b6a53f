"""qtorch.hf (API.md, "Hugging Face and PEFT") on tiny transformers models built offline from
configs (Llama-, BERT- and GPT-2-style, random weights): quantizing on load, save_pretrained /
from_pretrained round trips with identical outputs, modules_to_not_convert, tied embeddings,
what code that reads `.weight` gets, and LoRA through PEFT (training, adapter round trip,
merging). Skipped, saying what to install, without transformers / peft."""

import dataclasses
import json
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install transformers (>= 5.0)")
os.environ.setdefault("TQDM_DISABLE", "1")

import qtorch  # noqa: E402
import qtorch.hf  # noqa: E402
from qtorch.hf import QtorchConfig  # noqa: E402
from qtorch.nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear  # noqa: E402
from qtorch.nn.linear import _QuantizedLinear  # noqa: E402
from tests.conftest import OpRecorder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "w8a8": (lambda **kw: QtorchConfig("w8a8", **kw), Int8DynamicLinear),
    "w8a16": (lambda **kw: QtorchConfig("w8a16", **kw), Int8WeightOnlyLinear),
    "w4a16": (lambda **kw: QtorchConfig("w4a16", group_size=32, **kw), Int4WeightOnlyLinear),
}
VOCAB = 96  # unlike any layer's width, so a tensor's shape says which layer it is


def _llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


FAMILIES = {
    "llama": (_llama, transformers.AutoModelForCausalLM),
    "bert": (_bert, transformers.AutoModel),
    "gpt2": (_gpt2, transformers.AutoModelForCausalLM),
}


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """family -> directory of its saved float checkpoint (and the float model)."""
    out = {}
    for fam, (build, _) in FAMILIES.items():
        model = build()
        path = tmp_path_factory.mktemp(fam)
        model.save_pretrained(path)
        out[fam] = (str(path), model)
    model = _llama(tie=True)
    path = tmp_path_factory.mktemp("llama_tied")
    model.save_pretrained(path)
    out["llama_tied"] = (str(path), model)
    return out


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def _out(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantizedLinear)}


def _load(fam, path, **kw):
    return FAMILIES[fam.removesuffix("_tied")][1].from_pretrained(path, **kw)


# ------------------------------------------------------------------------------ config


def test_config_serializes_its_fields_and_never_calibration_data():
    data = [{"input_ids": IDS}]
    cfg = QtorchConfig(
        "w4a16",
        group_size=64,
        symmetric=True,
        modules_to_not_convert=["lm_head"],
        calibration_data=data,
    )
    d = cfg.to_dict()
    assert d == {
        "quant_method": "qtorch",
        "config": "w4a16",
        "group_size": 64,
        "symmetric": True,
        "algorithm": "rtn",
        "zero_point": "int",
        "modules_to_not_convert": ["lm_head"],
    }
    assert "calibration_data" not in cfg.to_json_string() and dict(cfg) == d
    assert QtorchConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert cfg.qtorch_config() == qtorch.Int4WeightOnlyConfig(group_size=64, symmetric=True)
    assert QtorchConfig("w8a8").to_dict() == {
        "quant_method": "qtorch",
        "config": "w8a8",
        "algorithm": "rtn",
        "smoothquant_alpha": None,
        "modules_to_not_convert": None,
    }


def test_config_deepcopy_shares_calibration_data():
    """transformers deep-copies the model config: calibration data (maybe a generator) is
    shared, the fields copied."""
    import copy

    data = ({"input_ids": IDS} for _ in range(2))
    cfg = QtorchConfig("w8a8", modules_to_not_convert=["lm_head"], calibration_data=data)
    twin = copy.deepcopy(cfg)
    assert twin == cfg and twin.calibration_data is data
    assert twin.modules_to_not_convert is not cfg.modules_to_not_convert


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="config must be one of"):
        QtorchConfig("w3a16")
    with pytest.raises(ValueError, match=r"group_size=64 does not apply to config='w8a8'"):
        QtorchConfig("w8a8", group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        QtorchConfig("w4a16", group_size=48)
    with pytest.raises(TypeError, match="unexpected fields"):
        QtorchConfig("w8a8", bits=8)


def test_algorithm_is_passed_through_to_the_qtorch_config():
    """algorithm / smoothquant_alpha / zero_point reach the qtorch config where its class has
    the field; where it has not, a non-default value is a ValueError that says so."""
    for name, (cls, _) in qtorch.hf.config.CONFIGS.items():
        have = {f.name for f in dataclasses.fields(cls)}
        if "algorithm" in have:
            assert QtorchConfig(name, algorithm="mse").qtorch_config().algorithm == "mse"
        else:
            with pytest.raises(ValueError, match=f"{cls.__name__} has no `algorithm` field"):
                QtorchConfig(name, algorithm="mse")
    if "smoothquant_alpha" not in {f.name for f in dataclasses.fields(qtorch.Int8DynamicConfig)}:
        with pytest.raises(ValueError, match="no `smoothquant_alpha` field"):
            QtorchConfig("w8a8", smoothquant_alpha=0.5)


# ------------------------------------------------------------------ quantize on load


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("fam", ["llama", "bert", "gpt2"])
def test_quantize_on_load_save_reload_identical(float_dirs, tmp_path, fam, cfg_name):
    path, float_model = float_dirs[fam]
    make, cls = CONFIGS[cfg_name]
    model = _load(fam, path, quantization_config=make())
    layers = _quantized(model)
    assert layers and all(type(m) is cls for m in layers.values())
    # every linear layer but the LM head (transformers' default skips) is quantized
    float_left = [
        n for n, m in model.named_modules() if qtorch.hf._layers.linear_dims(m) is not None
    ]
    assert float_left == (["lm_head"] if fam != "bert" else [])
    out = _out(model)
    assert (out - _out(float_model)).abs().max() < 0.25 * _out(float_model).abs().max()

    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved == make().to_dict()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in layers:
            assert f"{name}.qweight" in keys and f"{name}.weight" not in keys
            assert f.get_slice(f"{name}.qweight").get_dtype() == (
                "U8" if cfg_name == "w4a16" else "I8"
            )

    reloaded = _load(fam, tmp_path)
    assert {n: type(m) for n, m in _quantized(reloaded).items()} == {
        n: type(m) for n, m in layers.items()
    }
    assert torch.equal(_out(reloaded), out)


def test_quantize_on_load_equals_load_then_quantize_(float_dirs):
    path, _ = float_dirs["llama"]
    on_load = _load("llama", path, quantization_config=QtorchConfig("w8a16"))
    after = qtorch.quantize_(
        _load("llama", path),
        qtorch.Int8WeightOnlyConfig(),
        filter_fn=lambda m, fqn: fqn != "lm_head",
    )
    assert torch.equal(_out(on_load), _out(after))
    for name, mod in _quantized(on_load).items():
        assert torch.equal(mod.dequantize(), after.get_submodule(name).dequantize())


class _Created(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (shape, dtype, device) of every tensor an op makes under it."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append((tuple(t.shape), t.dtype, t.device.type))
        return out


def test_reload_builds_no_float_weight_and_quantizes_nothing(float_dirs, tmp_path, monkeypatch):
    path, _ = float_dirs["llama"]
    _load("llama", path, quantization_config=CONFIGS["w4a16"][0]()).save_pretrained(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("reloading a qtorch checkpoint must not quantize anything")

    for cls in (Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear):
        monkeypatch.setattr(cls, "from_float", classmethod(forbidden))
    monkeypatch.setattr(qtorch.ops, "quantize_int4", forbidden)
    with _Created() as mode:
        model = _load("llama", tmp_path)
    shapes = {(m.out_features, m.in_features) for m in _quantized(model).values()}
    assert len(_quantized(model)) == 14
    float_weights = [
        (shape, dtype)
        for shape, dtype, device in mode.made
        if shape in shapes and dtype.is_floating_point and device != "meta"
    ]
    assert float_weights == []


def test_reloaded_model_runs_on_another_backend(float_dirs, tmp_path):
    """The checkpoint holds the canonical buffers: any backend reads it, with the results that
    backend gives for the model that was saved."""
    path, _ = float_dirs["llama"]
    model = _load("llama", path, quantization_config=CONFIGS["w4a16"][0]())
    model.save_pretrained(tmp_path)
    with qtorch.use_backend("reference"):
        expected = _out(model)
        reloaded = _load("llama", tmp_path)
        assert torch.equal(_out(reloaded), expected)


def test_bfloat16_model_round_trips_with_fp32_scales(float_dirs, tmp_path):
    path, _ = float_dirs["llama"]
    model = _load("llama", path, dtype=torch.bfloat16, quantization_config=CONFIGS["w8a8"][0]())
    out = _out(model)
    assert out.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    reloaded = _load("llama", tmp_path)
    for mod in _quantized(reloaded).values():
        assert mod.weight_scale.dtype == torch.float32
    assert torch.equal(_out(reloaded), out)


def test_modules_to_not_convert_keeps_those_layers_float(float_dirs, tmp_path):
    path, _ = float_dirs["llama"]
    model = _load(
        "llama", path, quantization_config=QtorchConfig("w8a8", modules_to_not_convert=["q_proj"])
    )
    # a list of its own replaces transformers' default skips: lm_head is quantized too
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert isinstance(model.lm_head, Int8DynamicLinear)
    model.save_pretrained(tmp_path)
    reloaded = _load("llama", tmp_path)
    assert {n for n, m in reloaded.named_modules() if type(m) is torch.nn.Linear} == kept
    assert torch.equal(_out(reloaded), _out(model))


def test_layer_the_config_cannot_take_stays_float_and_is_named(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.warns(
        UserWarning,
        match=r"mlp\.down_proj \(in_features=96 is not divisible "
        r"by group_size=64\)",
    ):
        model = _load("llama", tmp_path, quantization_config=QtorchConfig("w4a16", group_size=64))
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4WeightOnlyLinear)


def test_a_damaged_checkpoint_is_a_clear_error(float_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = float_dirs["llama"]
    _load("llama", path, quantization_config=CONFIGS["w4a16"][0]()).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.zeros"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks model\.layers\.0\.mlp\.up_proj\.zeros"):
        _load("llama", tmp_path)


def test_missing_import_gives_transformers_unknown_quant_method(float_dirs, tmp_path, monkeypatch):
    """Without `import qtorch.hf` (here: its registration taken out of transformers' registry)
    transformers does not know quant_method "qtorch": it says "Unknown quantization type, got
    qtorch" and, as for any unknown quant_method in config.json, skips quantization and loads
    the quantized layers as float ones with random weights (its load report lists their
    qweight as unexpected). The README says so, and what to import."""
    import logging

    from transformers.quantizers import auto

    path, _ = float_dirs["llama"]
    _load("llama", path, quantization_config=QtorchConfig("w8a16")).save_pretrained(tmp_path)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "qtorch")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "qtorch")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model = _load("llama", tmp_path)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("Unknown quantization type, got qtorch" in m for m in messages)
    assert not _quantized(model)
    assert "import qtorch.hf" not in open(os.path.join(ROOT, "qtorch", "__init__.py")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "import qtorch.hf" in readme and "Unknown quantization type, got qtorch" in readme


def test_calibration_data_reaches_quantize_(float_dirs, tmp_path, monkeypatch):
    """quantize_model with calibration data goes through qtorch.quantize_(...,
    calibration_data=...) (which runs the model on it); a GPT-2 Conv1D layer is handed to it
    as the equivalent nn.Linear, and one it leaves float becomes the same Conv1D again. (Here
    quantize_ is wrapped to take the argument; the calibrated algorithms themselves are tested
    where they live.)"""
    import inspect

    real = qtorch.quantize_
    seen = []

    def quantize_(model, config, filter_fn=None, *, calibration_data=None):
        seen.append(list(calibration_data))
        return real(model, config, lambda m, fqn: filter_fn(m, fqn) and "c_fc" not in fqn)

    if "calibration_data" not in inspect.signature(real).parameters:
        monkeypatch.setattr(qtorch, "quantize_", quantize_)
    path, float_model = float_dirs["gpt2"]
    model = _load("gpt2", path)
    c_fc = model.transformer.h[0].mlp.c_fc
    data = [{"input_ids": IDS}]
    qtorch.hf.quantize_model(model, QtorchConfig("w8a16"), calibration_data=data)
    if seen:
        assert seen == [data]
        assert model.transformer.h[0].mlp.c_fc is c_fc  # left float: the original Conv1D
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8WeightOnlyLinear)
    model.save_pretrained(tmp_path)
    assert torch.equal(_out(_load("gpt2", tmp_path)), _out(model))


@pytest.mark.skipif(
    "algorithm" not in {f.name for f in dataclasses.fields(qtorch.Int4WeightOnlyConfig)},
    reason="this qtorch has no calibrated algorithms (algorithm=)",
)
def test_gptq_on_load_with_calibration_data_round_trips(float_dirs, tmp_path):
    path, _ = float_dirs["llama"]
    data = [
        {"input_ids": torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]
    with pytest.raises(ValueError, match="calibration_data"):
        _load(
            "llama",
            path,
            quantization_config=QtorchConfig("w4a16", group_size=32, algorithm="gptq"),
        )
    cfg = QtorchConfig("w4a16", group_size=32, algorithm="gptq", calibration_data=data)
    model = _load("llama", path, quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved["algorithm"] == "gptq" and "calibration_data" not in saved
    assert torch.equal(_out(_load("llama", tmp_path)), _out(model))


def test_awq_field_serializes_only_when_set_and_needs_calibration():
    """awq=True reaches Int4WeightOnlyConfig(awq=True) and needs calibration data; a config
    without it serializes exactly as before the field existed (no "awq" key), so checkpoints
    written by an older qtorch and by this one read the same."""
    plain = QtorchConfig("w4a16", group_size=32)
    assert "awq" not in plain.to_dict() and plain.qtorch_config().awq is False
    assert not plain.needs_calibration()
    cfg = QtorchConfig("w4a16", group_size=32, algorithm="gptq", awq=True)
    d = cfg.to_dict()
    assert d["awq"] is True and d["algorithm"] == "gptq"
    assert QtorchConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert cfg.qtorch_config() == qtorch.Int4WeightOnlyConfig(
        group_size=32, algorithm="gptq", awq=True
    )
    assert QtorchConfig("w4a16", awq=True).needs_calibration()  # rtn + awq reads activations
    with pytest.raises(ValueError, match=r"awq=True does not apply to config='w8a16'"):
        QtorchConfig("w8a16", awq=True)
    with pytest.raises(TypeError, match="awq must be a bool"):
        QtorchConfig("w4a16", awq=1)


def test_awq_on_load_equals_quantize_with_awq_and_round_trips(float_dirs, tmp_path):
    """QtorchConfig(awq=True) quantizes as qtorch.quantize_(Int4WeightOnlyConfig(awq=True))
    does on the same data (the norms it folds scales into change, so the field is not
    dropped on the way), the result saves and reloads to identical outputs, and without
    calibration data it is a ValueError naming it."""
    path, _ = float_dirs["llama"]
    data = [
        {"input_ids": torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]
    with pytest.raises(ValueError, match="awq=True.*calibration_data"):
        qtorch.hf.quantize_model(_load("llama", path), QtorchConfig("w4a16", awq=True))
    cfg = QtorchConfig("w4a16", group_size=32, algorithm="gptq", awq=True)
    model = qtorch.hf.quantize_model(_load("llama", path), cfg, calibration_data=data)
    direct = _load("llama", path)
    norm0 = direct.model.layers[0].input_layernorm.weight.detach().clone()
    qtorch.quantize_(
        direct,
        qtorch.Int4WeightOnlyConfig(group_size=32, algorithm="gptq", awq=True),
        filter_fn=lambda m, fqn: fqn != "lm_head",
        calibration_data=data,
    )
    assert not torch.equal(direct.model.layers[0].input_layernorm.weight, norm0)
    assert torch.equal(
        model.model.layers[0].input_layernorm.weight, direct.model.layers[0].input_layernorm.weight
    )
    assert torch.equal(_out(model), _out(direct))
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved["awq"] is True and "calibration_data" not in saved
    assert torch.equal(_out(_load("llama", tmp_path)), _out(model))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux memory maps")
def test_release_drops_the_pages_of_a_checkpoint_tensor_and_keeps_its_values(tmp_path):
    """Quantizing on load reads each float weight from the checkpoint's memory map once; its
    pages are given back afterwards (they would stay resident until loading ends)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qtorch.hf import _memory

    def rss_file_kib():
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1])

    w = torch.randn(1024, 1024)  # 4 MiB
    path = str(tmp_path / "w.safetensors")
    save_file({"w": w}, path)
    with safe_open(path, "pt") as f:
        t = f.get_slice("w")[...]
        assert torch.equal(t, w)  # every page read: resident
        before = rss_file_kib()
        dropped = _memory.release([t], {path})
        after = rss_file_kib()
        assert dropped >= 4 * 2**20 - 2 * 4096
        assert after <= before - 3 * 1024
        assert torch.equal(t, w)  # a later read faults the pages in again from the file
        assert _memory.release([w], {path}) == 0  # not a view of the file: left alone


# ----------------------------------------------------------------------- tied weights


def test_tied_lm_head_stays_float_and_tied_so_resizing_works(float_dirs, tmp_path):
    path, _ = float_dirs["llama_tied"]
    with pytest.warns(UserWarning, match=r"lm_head \(tied to model\.embed_tokens\.weight"):
        model = _load(
            "llama", path, quantization_config=QtorchConfig("w8a8", modules_to_not_convert=[])
        )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8DynamicLinear)
    model.save_pretrained(tmp_path)
    reloaded = _load("llama", tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_out(reloaded), _out(model))
    reloaded.resize_token_embeddings(VOCAB + 8)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.lm_head.weight.shape[0] == VOCAB + 8


def test_quantize_on_tied_head_warns_and_tying_or_resizing_then_fails_clearly(float_dirs):
    path, _ = float_dirs["llama_tied"]
    model = _load("llama", path)
    with pytest.warns(
        UserWarning,
        match=r"lm_head\.weight was tied to "
        r"model\.embed_tokens\.weight",
    ):
        qtorch.quantize_(model, qtorch.Int8WeightOnlyConfig())
    for action in (lambda: model.resize_token_embeddings(VOCAB + 8), model.tie_weights):
        with pytest.raises(AttributeError, match=r"no float `weight`.*\.dequantize\(\)"):
            action()


def test_quantize_model_on_a_loaded_model_saves_a_qtorch_checkpoint(float_dirs, tmp_path):
    path, _ = float_dirs["gpt2"]
    model = _load("gpt2", path)
    qtorch.hf.quantize_model(model, CONFIGS["w4a16"][0]())
    assert isinstance(model.transformer.h[0].attn.c_attn, Int4WeightOnlyLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: kept float
    model.save_pretrained(tmp_path)
    reloaded = _load("gpt2", tmp_path)
    assert torch.equal(_out(reloaded), _out(model))
    on_load = _load("gpt2", path, quantization_config=CONFIGS["w4a16"][0]())
    assert torch.equal(_out(on_load), _out(model))


def test_quantize_model_refuses_layers_quantized_with_another_config(float_dirs):
    """A qtorch checkpoint describes one config: a W8A8 layer saved under a W8A16 config would
    come back as W8A16, a silently different model."""
    path, _ = float_dirs["llama"]
    model = _load("llama", path)
    qtorch.quantize_(
        model, qtorch.Int8DynamicConfig(), filter_fn=lambda m, fqn: fqn.endswith("q_proj")
    )
    with pytest.raises(ValueError, match=r"self_attn\.q_proj is already a Int8DynamicLinear"):
        qtorch.hf.quantize_model(model, QtorchConfig("w8a16"))


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_dequantize_gives_the_float_layers_back(float_dirs, tmp_path, fam):
    path, float_model = float_dirs[fam]
    model = _load(fam, path, quantization_config=CONFIGS["w8a16"][0]())
    weights = {n: m.dequantize() for n, m in _quantized(model).items()}
    out = _out(model)
    model.dequantize()
    assert not _quantized(model) and not getattr(model, "is_quantized", False)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is type(float_model.get_submodule(name))  # Conv1D stays Conv1D
        assert torch.equal(layer.weight.t() if fam == "gpt2" else layer.weight, w)
    qtorch.testing.assert_close(_out(model), out, dtype=torch.float32)
    model.save_pretrained(tmp_path)  # a float checkpoint the float model class loads
    assert torch.equal(_out(_load(fam, tmp_path)), _out(model))


# ------------------------------------------------------------------------------- PEFT

try:
    import peft
except ImportError:
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="pip install peft (>= 0.19)")


def _lora(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw)


def _train(model, steps=6, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@needs_peft
@pytest.mark.parametrize("cfg_name", ["w8a8", "w4a16"])
def test_lora_trains_through_the_quantized_layers(float_dirs, cfg_name):
    path, _ = float_dirs["llama"]
    model = _load("llama", path, quantization_config=CONFIGS[cfg_name][0]())
    before = {n: m.dequantize() for n, m in _quantized(model).items()}
    pm = qtorch.hf.get_peft_model(model, _lora())
    lora_layers = [m for m in pm.modules() if isinstance(m, qtorch.hf.QtorchLoraLinear)]
    assert len(lora_layers) == 4
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with OpRecorder() as rec:
        losses = _train(pm, steps=1)
    # layer 0's adapters get their gradient through the quantized layers above them
    names = {str(op) for op, _ in rec.calls}
    assert any("linear_packed_grad_input" in n or "linear_grad_input" in n for n in names)
    losses += _train(pm, steps=4)
    assert losses[-1] < losses[0] - 0.1
    for name, w in before.items():  # the frozen base never changes
        mod = pm.base_model.model.get_submodule(name)
        mod = getattr(mod, "base_layer", mod)
        assert torch.equal(mod.dequantize(), w)


@needs_peft
def test_lora_all_linear_targets_the_qtorch_layers_but_the_head(float_dirs):
    path, _ = float_dirs["llama"]
    model = _load("llama", path, quantization_config=CONFIGS["w8a16"][0]())
    quantized = set(_quantized(model))
    pm = qtorch.hf.get_peft_model(model, _lora(target_modules="all-linear"))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, qtorch.hf.QtorchLoraLinear)
    }
    assert wrapped == quantized and "lm_head" not in wrapped


@needs_peft
def test_lora_on_gpt2_conv1d_layers(float_dirs):
    path, _ = float_dirs["gpt2"]
    model = _load("gpt2", path, quantization_config=CONFIGS["w4a16"][0]())
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        pm = qtorch.hf.get_peft_model(model, _lora(target_modules=["c_attn"], fan_in_fan_out=True))
    losses = _train(pm, steps=3)
    assert losses[-1] < losses[0]


@needs_peft
def test_lora_adapter_save_and_load_round_trip(float_dirs, tmp_path):
    path, _ = float_dirs["llama"]
    pm = qtorch.hf.get_peft_model(
        _load("llama", path, quantization_config=CONFIGS["w4a16"][0]()), _lora()
    )
    _train(pm, steps=3)
    expected = _out(pm)
    pm.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path))
    base = _load("llama", path, quantization_config=CONFIGS["w4a16"][0]())
    loaded = qtorch.hf.peft_from_pretrained(base, tmp_path)
    assert torch.equal(_out(loaded), expected)
    # PEFT's own entry point needs the layers registered on its config
    base = _load("llama", path, quantization_config=CONFIGS["w4a16"][0]())
    with pytest.raises(ValueError, match="Int4WeightOnlyLinear.*is not supported"):
        peft.PeftModel.from_pretrained(base, tmp_path)


@needs_peft
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_merge_requantizes_and_warns_with_the_error_it_adds(float_dirs, cfg_name):
    path, _ = float_dirs["llama"]
    pm = qtorch.hf.get_peft_model(
        _load("llama", path, quantization_config=CONFIGS[cfg_name][0]()), _lora()
    )
    _train(pm, steps=3)
    unmerged = _out(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    original = layer.base_layer
    target = original.dequantize() + layer.get_delta_weight("default")
    with pytest.warns(
        UserWarning,
        match=r"re-quantizes W \+ ΔW.*adds an error of [0-9.]+% "
        r"of ‖ΔW‖",
    ) as rec:
        layer.merge()
    assert "model.layers.0.self_attn.q_proj" in str(rec[0].message)
    merged_w = layer.base_layer.dequantize()
    err = merged_w - target
    assert err.abs().max().item() == pytest.approx(layer.merge_error["max_abs"])
    # round to nearest on the layer's own grid: at most about one step per element
    assert layer.merge_error["rel_to_weight"] < (0.15 if cfg_name == "w4a16" else 0.01)
    assert type(layer.base_layer) is type(original)
    layer.unmerge()  # exact
    assert layer.base_layer is original and torch.equal(_out(pm), unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is type(original)
    assert torch.equal(q_proj.dequantize(), merged_w)
    scale = unmerged.abs().max().item()
    tol = 0.25 if cfg_name == "w4a16" else 0.05
    assert (_out(merged) - unmerged).abs().max().item() < tol * scale


@needs_peft
def test_merge_with_lora_bias_moves_it_into_the_bias(float_dirs):
    path, _ = float_dirs["bert"]
    pm = qtorch.hf.get_peft_model(
        _load("bert", path, quantization_config=QtorchConfig("w8a16")),
        _lora(target_modules=["query"], lora_bias=True),
    )
    layer = pm.base_model.model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
        layer.lora_B["default"].bias.normal_(0, 0.1)
    unmerged = _out(pm)
    bias = layer.base_layer.bias.detach().clone()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge(safe_merge=True)
    expected = bias + layer.lora_B["default"].bias * layer.scaling["default"]
    torch.testing.assert_close(layer.base_layer.bias, expected)
    assert (_out(pm) - unmerged).abs().max() < 0.02 * unmerged.abs().max()
    layer.unmerge()
    assert torch.equal(layer.base_layer.bias, bias) and torch.equal(_out(pm), unmerged)


@needs_peft
def test_lora_variants_that_need_the_float_weight_raise(float_dirs):
    path, _ = float_dirs["llama"]
    model = _load("llama", path, quantization_config=CONFIGS["w8a16"][0]())
    with pytest.raises(ValueError, match="plain LoRA only"):
        qtorch.hf.get_peft_model(model, _lora(use_dora=True))


# ---------------------------------------------------------------------- qtorch quantize


def test_qtorch_quantize_command(float_dirs, tmp_path, capsys):
    from qtorch.cli import main

    path, _ = float_dirs["llama"]
    out_dir = str(tmp_path / "q")
    assert main(["quantize", path, out_dir, "--config", "w4a16", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "MB before" in out and "MB after" in out
    assert "model.layers.0.mlp.down_proj" in out and "W4A16 g32" in out
    assert "lm_head" in out and "kept in float: 'lm_head'" in out
    assert "linear layers: 14 of 15 quantized" in out
    assert "weights on disk:" in out and "time: load + quantize" in out
    reloaded = _load("llama", out_dir)
    expected = _load("llama", path, quantization_config=CONFIGS["w4a16"][0]())
    assert torch.equal(_out(reloaded), _out(expected))


def test_qtorch_quantize_help_explains_each_option(capsys):
    from qtorch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "MODEL_DIR",
        "OUT_DIR",
        "--config",
        "--group-size",
        "--algorithm",
        "--calibration",
        "--skip",
        "w8a8:",
        "w4a16:",
        "gptq",
    ):
        assert option in out
    with pytest.raises(SystemExit, match="--group-size and --symmetric are w4a16 options"):
        main(["quantize", ".", str(os.devnull), "--config", "w8a8", "--group-size", "64"])
    assert "--awq" in out
    with pytest.raises(SystemExit, match="--awq is a w4a16 option"):
        main(["quantize", ".", str(os.devnull), "--config", "w8a16", "--awq"])
