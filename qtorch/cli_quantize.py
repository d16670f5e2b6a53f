"""`qtorch quantize MODEL_DIR OUT_DIR --config {w8a8,w8a16,w4a16} ...`: quantize a local Hugging
Face model and save it as `save_pretrained` does (qtorch checkpoint, loadable with
`from_pretrained` once `qtorch.hf` is imported)."""

from __future__ import annotations

import argparse
import json
import os
import time

DESCRIPTION = """\
Load a local Hugging Face model (a directory with config.json and safetensors weights, or a
GGUF file), quantize its linear layers with qtorch, and save it to OUT_DIR as save_pretrained
does: safetensors with the canonical int8/int4 buffers and a config.json whose
quantization_config has quant_method "qtorch". Load the result with
AutoModel*.from_pretrained(OUT_DIR) after `import qtorch.hf`.

Data-free configs quantize while loading, layer by layer (peak memory: the quantized model
plus about one layer in float); GPTQ and SmoothQuant load the float model, run it on the
calibration text, then quantize. Prints a table of the layers, the bytes before and after, and
the time taken."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="local model: a directory with config.json and *.safetensors, or a "
        ".gguf file (dequantized to float, then quantized)",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to save the quantized model")
    p.add_argument(
        "--config",
        required=True,
        choices=["w8a8", "w8a16", "w4a16"],
        help="w8a8: int8 weights per channel and dynamic int8 activations; "
        "w8a16: int8 weights, float activations; w4a16: int4 weights in groups "
        "(see --group-size), float activations",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        choices=[32, 64, 128, 256],
        help="w4a16 only: weights per int4 group along K (default 128); a layer "
        "whose in_features it does not divide stays float and is listed",
    )
    p.add_argument(
        "--symmetric",
        action="store_true",
        help="w4a16 only: symmetric int4 (zero point 8) instead of asymmetric",
    )
    p.add_argument(
        "--algorithm",
        default="rtn",
        choices=["rtn", "mse", "gptq"],
        help="how weights are mapped to the grid: rtn (round to nearest, default), "
        "mse (data-free search of the clipping range), gptq (needs "
        "--calibration); needs a qtorch with calibrated algorithms for mse/gptq",
    )
    p.add_argument(
        "--awq",
        action="store_true",
        help="w4a16 only: activation-aware channel scaling (AWQ) before --algorithm "
        "(needs --calibration); the stored format is unchanged",
    )
    p.add_argument(
        "--smoothquant-alpha",
        type=float,
        default=None,
        metavar="ALPHA",
        help="w8a8 only: SmoothQuant migration strength in [0, 1] (needs --calibration)",
    )
    p.add_argument(
        "--calibration",
        metavar="TEXT_FILE",
        default=None,
        help="plain-text file whose tokens calibrate gptq / SmoothQuant: cut into "
        "--calibration-samples blocks of --calibration-seq-len tokens",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=16,
        metavar="N",
        help="calibration blocks (default 16)",
    )
    p.add_argument(
        "--calibration-seq-len",
        type=int,
        default=256,
        metavar="L",
        help="tokens per calibration block (default 256)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=None,
        metavar="NAME",
        help="module-name substrings to keep in float, e.g. --skip lm_head. Default: "
        "what transformers' quantizers skip (the LM head, layers tied to the "
        "input embedding, the last module); `--skip` with no name converts "
        "every layer it can (a tied layer still stays float, so the tie holds)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to load the float weights in, and the activations' dtype of the "
        "saved model (default: the checkpoint's)",
    )


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _dir_bytes(path: str, exts=(".safetensors", ".bin", ".gguf")) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(exts))


def _calibration(tokenizer, path: str, samples: int, seq_len: int) -> list[dict]:
    ids = tokenizer(open(path, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if not blocks:
        blocks = [ids]
    return [{"input_ids": b[None]} for b in blocks]


def _layer_rows(model, float_dtype) -> list[dict]:
    """One row per linear layer: its name, what it became (and why a float one stayed float),
    its shape and bytes."""
    import torch
    from torch import nn

    from qtorch.hf import _layers
    from qtorch.nn.linear import _QuantizedLinear

    elt = torch.empty(0, dtype=float_dtype).element_size()
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, _QuantizedLinear):
            n, k = m.out_features, m.in_features
            bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            after = sum(t.numel() * t.element_size() for t in m._canonical().values()) + bias
            kind = m._FAMILY.upper()
            if getattr(m, "group_size", None):
                kind += f" g{m.group_size}"
            rows.append(
                {
                    "layer": name,
                    "as": kind,
                    "shape": f"{n}x{k}",
                    "before": n * k * elt + bias,
                    "after": after,
                    "note": "",
                }
            )
        elif _layers.linear_dims(m) is not None or isinstance(m, nn.Linear):
            size = sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
            k, n, _ = _layers.linear_dims(m) or (m.in_features, m.out_features, False)
            rows.append(
                {
                    "layer": name,
                    "as": "float",
                    "shape": f"{n}x{k}",
                    "before": size,
                    "after": size,
                    "note": _why_float(model, name),
                }
            )
    return rows


def _why_float(model, name: str) -> str:
    from qtorch.hf import _layers

    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return ""
    if name in q.skipped:
        return q.skipped[name]
    pattern = _layers.skipped_by(name, q.skip)
    return f"kept in float: {pattern!r} (modules_to_not_convert)" if pattern else ""


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    import qtorch.hf

    if args.config != "w4a16" and (args.group_size is not None or args.symmetric):
        raise SystemExit("qtorch quantize: --group-size and --symmetric are w4a16 options")
    if args.config != "w4a16" and args.awq:
        raise SystemExit("qtorch quantize: --awq is a w4a16 option")
    qcfg = qtorch.hf.QtorchConfig(
        args.config,
        **(
            {"group_size": args.group_size or 128, "symmetric": args.symmetric, "awq": args.awq}
            if args.config == "w4a16"
            else {}
        ),
        algorithm=args.algorithm,
        **(
            {"smoothquant_alpha": args.smoothquant_alpha}
            if args.smoothquant_alpha is not None
            else {}
        ),
        modules_to_not_convert=args.skip,
    )
    src = args.model_dir
    gguf = None
    if os.path.isfile(src) and src.endswith(".gguf"):
        src, gguf = os.path.dirname(os.path.abspath(src)), os.path.basename(src)
    elif not os.path.isdir(src):
        raise SystemExit(
            f"qtorch quantize: MODEL_DIR {args.model_dir!r} is not a directory or .gguf file"
        )
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if gguf and dtype == "auto":
        dtype = torch.float32  # a GGUF's own type is a quantized one
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    except (OSError, ValueError, TypeError, KeyError):
        if args.calibration:
            raise
    config = transformers.AutoConfig.from_pretrained(src, gguf_file=gguf)
    cls = _model_class(config) if not gguf else transformers.AutoModelForCausalLM
    calibration = None
    if args.calibration:
        if tokenizer is None:
            raise SystemExit("qtorch quantize: --calibration needs the model's tokenizer")
        calibration = _calibration(
            tokenizer, args.calibration, args.calibration_samples, args.calibration_seq_len
        )
    print(
        f"qtorch quantize: {args.model_dir} -> {args.out_dir}\n  {cls.__name__}, "
        f"{json.dumps(qcfg.to_dict())}",
        flush=True,
    )

    t0 = time.perf_counter()
    if gguf or qcfg.needs_calibration():
        # transformers cannot quantize a GGUF file on load; calibration needs the float model
        model = cls.from_pretrained(src, gguf_file=gguf, dtype=dtype)
        qtorch.hf.quantize_model(model, qcfg, calibration_data=calibration, progress=True)
    else:
        model = cls.from_pretrained(src, dtype=dtype, quantization_config=qcfg)
    t_quant = time.perf_counter() - t0
    float_dtype = next(
        (m._weight_dtype for m in model.modules() if "_weight_dtype" in m.__dict__), torch.float32
    )
    rows = _layer_rows(model, float_dtype)
    t0 = time.perf_counter()
    model.save_pretrained(args.out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out_dir)
    t_save = time.perf_counter() - t0

    _print_table(rows)
    before = sum(r["before"] for r in rows)
    after = sum(r["after"] for r in rows)
    nq = sum(r["as"] != "float" for r in rows)
    print(
        f"\nlinear layers: {nq} of {len(rows)} quantized; their bytes {_mb(before)} MB -> "
        f"{_mb(after)} MB ({after / max(before, 1):.1%})"
    )
    print(
        f"weights on disk: {_mb(_dir_bytes(args.model_dir))} MB -> "
        f"{_mb(_dir_bytes(args.out_dir))} MB"
    )
    print(f"time: load + quantize {t_quant:.1f} s, save {t_save:.1f} s")
    return 0


def _print_table(rows: list[dict]) -> None:
    cells = [
        [r["layer"], r["as"], r["shape"], _mb(r["before"]), _mb(r["after"]), r["note"]]
        for r in rows
    ]
    heads = ["layer", "as", "shape [N x K]", "MB before", "MB after", ""]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)
    ]
    right = {3, 4}
    fmt = lambda vals: "  ".join(  # noqa: E731
        v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))
    )
    print()
    print(fmt(heads))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print(fmt(c))
