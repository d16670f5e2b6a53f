"""qtorch under torch.distributed, on the CPU with gloo (API.md, "Distributed").

One run of WORLD = 3 processes, started once for this file (process start-up is its cost),
computes every case; each test compares what the ranks returned with the single-process op
on the whole heads, computed here in the test process.

Vocabulary-parallel loss (`qtorch.distributed.fused_linear_distillation_loss`), each case on
3 ranks (the world), on 2 (the group of ranks 1 and 2: group ranks are not world ranks) and on
1 (each rank alone): uneven blocks (one case with an empty one), every divergence × reduction,
T != 1, alpha, labels=None, ignore_index (also a valid vocabulary id), all tokens ignored,
num_items_in_batch (int, tensor, 0), masked (-inf) teacher entries including a whole block,
NaN in a counted / an ignored token, bf16, fp16, fp64, leading dims, the default chunk, a
frozen head, hidden states without a gradient, quantized teacher heads (int4, W8A8); the loss
on every rank and every gradient (student_hidden: the full one; the shards: their rows) against
`qtorch.ops.fused_linear_distillation_loss` (a quantized teacher: against
`qtorch.ops.distillation_loss` on the student logits and the teacher modules' outputs). Errors
raise on every rank, and the ranks stay in step after them. No rank makes a tensor of more than
[chunk, V_r] logits, nor anything vocabulary-sized.

Data parallel: a tiny transformer with a frozen qtorch-quantized block (W4A16 attention, W8A8
MLP), LoRA adapters on two of its quantized layers and a trainable head, trained STEPS steps
with the fused distillation loss and `num_items_in_batch` = the global count of counted tokens
(the README's recipe; the ranks count different numbers of tokens), against one process on the
global batch: under DDP with `qtorch.distributed.ddp_ignore_quantized_buffers` (the ranks
starting from other weights and another layout than rank 0), plain DDP (all ranks alike), and
FSDP2 (`fully_shard` on a quantized layer, the block and the model); a `state_dict()` between
steps, after which the quantized modules must pack again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import qtorch
import qtorch.distributed as qdist
from qtorch.testing import assert_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

WORLD = 3
IGNORE = -100


# ------------------------------------------------------------------ the loss cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    divergence: str = "kl"
    reduction: str = "mean"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    ignore_index: int = IGNORE
    labels: str = "some"  # "some" ignored, "none" (labels=None), "all" ignored, "out_of_range"
    num_items: object = None  # None, an int, or ("tensor", n)
    bias: bool = True
    lead: tuple = (13,)  # the tokens' leading dims
    chunk: int | None = 4
    dtype: torch.dtype = torch.float32
    teacher: str = "tensor"  # "tensor", or a qtorch module: "int4", "w8a8"
    frozen_head: bool = False
    hidden_grad: bool = True
    masked: str = ""  # "entries": some teacher logits -inf; "block": all of one rank's block
    nan: str = ""  # "counted" / "ignored": a NaN teacher logit in such a token
    vocab: int = 37
    hidden: tuple = (16, 32)  # (H, Ht)
    fault: str = ""  # "rows": the last rank's teacher shard one row short; "kwargs"; "bias"

    def splits(self, w: int) -> tuple:
        """Rows per group rank, uneven; "empty": rank 0 of the group holds none."""
        if self.name == "empty_block":
            return {3: (0, 20, 17), 2: (0, 37), 1: (37,)}[w]
        return {3: (5, 20, 12), 2: (25, 12), 1: (37,)}[w]


CASES = [
    *[
        Case(f"{d}-{r}", divergence=d, reduction=r, beta=0.3)
        for d in ("kl", "reverse_kl", "jsd")
        for r in ("mean", "sum", "none")
    ],
    Case("T1", temperature=1.0),
    Case("alpha0", alpha=0.0),
    Case("alpha1", alpha=1.0),
    Case("jsd_beta0", divergence="jsd", beta=0.0),
    Case("jsd_beta1", divergence="jsd", beta=1.0),
    Case("no_labels", labels="none", alpha=1.0, divergence="reverse_kl"),
    Case("ignore_index_is_a_token", ignore_index=3),
    Case("all_ignored", labels="all"),
    Case("num_items_int", num_items=40),
    Case("num_items_tensor", num_items=("tensor", 7), divergence="jsd"),
    Case("num_items_zero", num_items=0),
    Case("masked_entries", masked="entries", divergence="reverse_kl"),
    Case("masked_block", masked="block", divergence="jsd"),
    Case("nan_counted", nan="counted"),
    Case("nan_ignored", nan="ignored"),
    Case("bf16", dtype=torch.bfloat16, divergence="jsd"),
    Case("fp16", dtype=torch.float16, divergence="reverse_kl"),
    Case("fp64", dtype=torch.float64, reduction="none"),
    Case("lead_dims", lead=(3, 5), reduction="none"),
    Case("default_chunk", chunk=None, lead=(40,)),
    Case("no_bias", bias=False),
    Case("frozen_head", frozen_head=True),
    # errors, between other cases: the ranks must stay in step after them
    Case("error_label_range", labels="out_of_range"),
    Case("error_rows", fault="rows"),
    Case("error_kwargs", fault="kwargs"),
    Case("error_bias_with_module", teacher="int4", hidden=(16, 64), fault="bias"),
    Case("hidden_no_grad", hidden_grad=False, reduction="sum"),
    Case("empty_block"),
    Case("teacher_int4", teacher="int4", hidden=(16, 64)),
    Case("teacher_w8a8", teacher="w8a8", reduction="none"),
]


def inputs(case: Case) -> dict:
    """The whole heads and the tokens of `case`, the same in every process."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    (h, ht), v, lead = case.hidden, case.vocab, case.lead
    x = {
        "sh": torch.randn(*lead, h, generator=g),
        "sw": torch.randn(v, h, generator=g) / h**0.5 * 3,
        "sb": torch.randn(v, generator=g),
        "th": torch.randn(*lead, ht, generator=g),
        "tw": torch.randn(v, ht, generator=g) / ht**0.5 * 3,
        "tb": torch.randn(v, generator=g),
        "grad_out": torch.rand(*lead, generator=g),
    }
    labels = torch.randint(0, v, lead, generator=g)
    labels.view(-1)[::4] = case.ignore_index
    if case.labels == "all":
        labels.fill_(case.ignore_index)
    elif case.labels == "out_of_range":
        labels.view(-1)[1] = v
    x["labels"] = None if case.labels == "none" else labels
    if case.masked == "entries":
        x["tb"][[2, 9, 30]] = float("-inf")
    elif case.masked == "block":  # the whole block of group rank 0 (of 3 ranks and of 2)
        x["tb"][:5] = float("-inf")
    if case.nan:  # every teacher logit of one token NaN; labels[::4] are the ignored ones
        row = 0 if case.nan == "ignored" else 1
        x["th"].view(-1, ht)[row, 0] = float("nan")
    for k in ("sh", "sw", "sb", "th", "tw", "tb"):
        x[k] = x[k].to(case.dtype)
    return x


def teacher_module(case: Case, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A quantized teacher head holding `weight`'s rows; quantization is per row, so a shard's
    module holds the rows of the whole head's."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    if case.teacher == "int4":
        return qtorch.nn.Int4WeightOnlyLinear.from_float(lin, group_size=32)
    return qtorch.nn.Int8DynamicLinear.from_float(lin)


def loss_kwargs(case: Case) -> dict:
    n = case.num_items
    return dict(
        temperature=case.temperature,
        alpha=case.alpha,
        divergence=case.divergence,
        beta=case.beta,
        ignore_index=case.ignore_index,
        reduction=case.reduction,
        num_items_in_batch=torch.tensor(n[1]) if isinstance(n, tuple) else n,
    )


def block(case: Case, w: int, r: int) -> tuple[int, int]:
    rows = case.splits(w)
    return sum(rows[:r]), sum(rows[: r + 1])


def backward(loss: torch.Tensor, case: Case, x: dict) -> None:
    if not loss.requires_grad:
        return
    (loss * x["grad_out"]).sum().backward() if case.reduction == "none" else loss.backward()


def run_loss(case: Case, w: int, r: int, group) -> dict:
    """Group rank r's call of the vocabulary-parallel loss on its blocks (in a worker)."""
    x = inputs(case)
    lo, hi = block(case, w, r)
    sh = x["sh"].clone().requires_grad_(case.hidden_grad)
    sw = x["sw"][lo:hi].clone().requires_grad_(not case.frozen_head)
    sb = x["sb"][lo:hi].clone().requires_grad_() if case.bias else None
    tw, tb = x["tw"][lo:hi], x["tb"][lo:hi] if case.bias else None
    kw = loss_kwargs(case)
    if case.fault == "rows" and r == w - 1:
        tw, tb = tw[1:], None if tb is None else tb[1:]
    if case.fault == "kwargs" and r == w - 1:
        kw["temperature"] += 1.0
    if case.teacher != "tensor":
        tw = teacher_module(case, tw, tb)
        tb = tb if case.fault == "bias" else None
    shapes = Shapes() if case.name in SHAPE_CASES else contextlib.nullcontext()
    try:
        with shapes:
            loss = qdist.fused_linear_distillation_loss(
                sh, sw, x["th"], tw, x["labels"], sb, tb, group=group, chunk_size=case.chunk, **kw
            )
            backward(loss, case, x)
    except Exception as e:  # the test asserts which; the next case must still run in step
        return {"error": type(e).__name__, "message": str(e)}
    return {
        "loss": loss.detach(),
        "gh": sh.grad,
        "gw": sw.grad,
        "gb": None if sb is None else sb.grad,
        "shapes": getattr(shapes, "shapes", None),
    }


SHAPE_CASES = ("kl-mean", "jsd-none", "teacher_int4")  # forward, backward, a module teacher


class Shapes(TorchDispatchMode):
    """The shapes of every floating-point tensor an op makes while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                self.shapes.add(tuple(o.shape))
        return out


def single_process(case: Case, w: int) -> dict:
    """The single-process op on the whole heads (a quantized teacher: `distillation_loss` on the
    student's logits and the outputs of the w blocks' teacher modules)."""
    x = inputs(case)
    sh = x["sh"].clone().requires_grad_(case.hidden_grad)
    sw = x["sw"].clone().requires_grad_(not case.frozen_head)
    sb = x["sb"].clone().requires_grad_() if case.bias else None
    tb = x["tb"] if case.bias else None
    kw = loss_kwargs(case)
    if case.teacher == "tensor":
        loss = qtorch.ops.fused_linear_distillation_loss(
            sh, sw, x["th"], x["tw"], x["labels"], sb, tb, chunk_size=case.chunk, **kw
        )
    else:
        blocks = [block(case, w, r) for r in range(w)]
        with torch.no_grad():
            t = torch.cat(
                [
                    teacher_module(case, x["tw"][lo:hi], None if tb is None else tb[lo:hi])(x["th"])
                    for lo, hi in blocks
                ],
                -1,
            )
        s = sh @ sw.T + (sb if sb is not None else 0)
        loss = qtorch.ops.distillation_loss(s, t, x["labels"], **kw)
    backward(loss, case, x)
    return {
        "loss": loss.detach(),
        "gh": sh.grad,
        "gw": sw.grad,
        "gb": None if sb is None else sb.grad,
    }


# ------------------------------------------------------------------ data parallel

D, HEADS, SEQ, TOKENS, HEAD_V, HT = 32, 2, 5, 50, 40, 24
BATCH = 6  # the global batch: BATCH // WORLD sequences per rank
STEPS = 3
DP_MODES = ("ddp", "ddp_plain", "fsdp2")


class LoRA(nn.Module):
    """y = base(x) + B A x, base a frozen quantized linear."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, D))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Student(nn.Module):
    """Frozen embedding and quantized block, LoRA on qkv and fc1, trainable norms and head;
    forward returns the fused distillation loss of the head against a teacher head."""

    def __init__(self):
        super().__init__()
        self.emb, self.block, self.ln = nn.Embedding(TOKENS, D), Block(), nn.LayerNorm(D)
        self.head = nn.Linear(D, HEAD_V)

    def forward(self, tokens, teacher_hidden, teacher_weight, labels, num_items=None):
        h = self.ln(self.block(self.emb(tokens)))
        return qtorch.ops.fused_linear_distillation_loss(
            h,
            self.head.weight,
            teacher_hidden,
            teacher_weight,
            labels,
            self.head.bias,
            temperature=2.0,
            alpha=0.5,
            num_items_in_batch=num_items,
        )


def student() -> Student:
    torch.manual_seed(0)
    m = Student()
    qtorch.quantize_(
        m.block,
        qtorch.Int4WeightOnlyConfig(group_size=32),
        filter_fn=lambda mod, name: name in ("qkv", "proj"),
    )
    qtorch.quantize_(
        m.block, qtorch.Int8DynamicConfig(), filter_fn=lambda mod, name: name in ("fc1", "fc2")
    )
    m.requires_grad_(False)
    m.block.qkv, m.block.fc1 = LoRA(m.block.qkv), LoRA(m.block.fc1)
    for mod in (m.block.ln1, m.block.ln2, m.ln, m.head):
        mod.requires_grad_(True)
    return m


def dp_data() -> dict:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, HEAD_V, (BATCH, SEQ), generator=g)
    labels[2, :3] = IGNORE  # so the ranks count 10, 7 and 4 tokens
    labels[4, :] = IGNORE
    labels[5, 0] = IGNORE
    return {
        "tokens": torch.randint(0, TOKENS, (BATCH, SEQ), generator=g),
        "th": torch.randn(BATCH, SEQ, HT, generator=g),
        "labels": labels,
        "tw": torch.randn(HEAD_V, HT, generator=g) / HT**0.5,
    }


def quantized(model: nn.Module) -> dict:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, qtorch.nn.linear._QuantizedLinear)
    }


def train(
    model: nn.Module, call, data: dict, num_items=None, scale: float = 1.0, state_dict=None
) -> list[float]:
    """STEPS of SGD with momentum on `call(batch) * scale`; a `state_dict()` after the first."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    losses = []
    for step in range(STEPS):
        loss = call(data["tokens"], data["th"], data["tw"], data["labels"], num_items)
        (loss * scale).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0:
            sd = (state_dict or model.state_dict)()
            del sd
    return losses


def run_dp(mode: str, rank: int) -> dict:
    """One rank's training on its BATCH // WORLD sequences (in a worker): the README's recipe,
    num_items_in_batch = the counted tokens of all ranks, the loss times the world size (DDP
    and FSDP2 average the gradients over the ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    per = BATCH // WORLD
    data = {k: v[rank * per : (rank + 1) * per] for k, v in dp_data().items() if k != "tw"}
    data["tw"] = dp_data()["tw"]
    count = (data["labels"] != IGNORE).sum()
    n_global = count.clone()
    dist.all_reduce(n_global)
    model = student()
    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.block.fc2, mesh=mesh)  # a quantized module as an FSDP unit of its own
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        call, state_dict = model, model.state_dict
    else:
        if mode == "ddp":
            if rank > 0:  # other weights, and the canonical layout (rank 0's stays packed):
                with torch.no_grad():  # rank 0's weights must win, as DDP promises
                    model.block.proj.scales.mul_(2)
            qdist.ddp_ignore_quantized_buffers(model)
        ddp = DDP(model)
        call, state_dict = ddp, ddp.state_dict
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = train(model, call, data, n_global, dist.get_world_size(), state_dict)
        params = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    except (RuntimeError, NotImplementedError) as e:  # (torch 2.13's gloo has all it needs)
        if mode != "fsdp2" or not any(w in str(e).lower() for w in ("gloo", "not supported")):
            raise
        return {
            "skip": f"FSDP2 on the CPU needs a collective that gloo lacks in torch "
            f"{torch.__version__}: {e}"
        }
    mods = quantized(model)
    return {
        "count": int(count),
        "losses": losses,
        "params": params,
        "packed": {n: m._layout is not None for n, m in mods.items()},
        "weights": {n: m.dequantize() for n, m in mods.items()},
        "warnings": [str(w.message) for w in caught if "qtorch" in str(w.message)],
    }


# ------------------------------------------------------------------ the run


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # 3 processes on a few cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    pair = dist.new_group([1, 2])
    alone = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in each
    res = {}
    for case in CASES:
        res[(case.name, 3)] = run_loss(case, 3, rank, None)
        if rank > 0:
            res[(case.name, 2)] = run_loss(case, 2, rank - 1, pair)
        res[(case.name, 1)] = run_loss(case, 1, 0, alone[rank])
    for mode in DP_MODES:
        res[mode] = run_dp(mode, rank)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    """Every rank's results, {key: result} per world rank."""
    d = tmp_path_factory.mktemp("distributed")
    # A fork server imports torch once and forks the ranks from it: three interpreters
    # importing torch side by side cost a few times more on a small machine.
    torch.multiprocessing.set_forkserver_preload(
        ["torch", "qtorch", "torch.distributed.fsdp", "torch.distributed.tensor", __name__]
    )
    torch.multiprocessing.start_processes(
        _worker, args=(str(d / "store"), str(d)), nprocs=WORLD, join=True, start_method="forkserver"
    )
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def group_results(runs, name: str, w: int) -> list[tuple[int, dict]]:
    """[(group rank, result)] of case `name` on w ranks (w = 1: each world rank alone)."""
    if w == 3:
        return [(r, runs[r][(name, 3)]) for r in range(3)]
    if w == 2:
        return [(r - 1, runs[r][(name, 2)]) for r in (1, 2)]
    return [(0, runs[r][(name, 1)]) for r in range(3)]


# ------------------------------------------------------------------ tests: the loss

NUMERIC = [c for c in CASES if not c.fault and c.labels != "out_of_range"]


@pytest.mark.parametrize("w", [3, 2, 1])
@pytest.mark.parametrize("case", NUMERIC, ids=[c.name for c in NUMERIC])
def test_loss_and_gradients_match_the_single_process_op(runs, case, w):
    ref = single_process(case, w)
    for r, got in group_results(runs, case.name, w):
        assert "error" not in got, got
        if case.nan == "counted":  # a NaN teacher logit in a counted token: non-finite
            assert not torch.isfinite(ref["loss"]).all()
            assert not torch.isfinite(got["loss"]).all()
            continue
        assert got["loss"].dtype == ref["loss"].dtype  # float32 (float64 from float64)
        assert_close(got["loss"], ref["loss"])
        for g in ("gh", "gw", "gb"):
            assert (got[g] is None) == (ref[g] is None), g
        if ref["gh"] is not None:
            assert got["gh"].dtype == case.dtype
            assert_close(got["gh"], ref["gh"])  # the full gradient on every rank
        lo, hi = block(case, w, r)
        if ref["gw"] is not None:
            assert got["gw"].shape == (hi - lo, case.hidden[0])
            assert_close(got["gw"], ref["gw"][lo:hi], scale=ref["gw"].abs().max().item())
        if ref["gb"] is not None:
            assert_close(got["gb"], ref["gb"][lo:hi], scale=ref["gb"].abs().max().item())


@pytest.mark.parametrize("w", [3, 2])
@pytest.mark.parametrize("name", SHAPE_CASES)
def test_no_rank_holds_more_than_a_chunk_of_its_block_of_logits(runs, name, w):
    case = next(c for c in CASES if c.name == name)
    for r, got in group_results(runs, name, w):
        lo, hi = block(case, w, r)
        # [rows, V_r]: the chunk's logits and what is made from them (and the weights' .T)
        rows = {s[0] for s in got["shapes"] if len(s) == 2 and s[1] == hi - lo}
        assert max(rows - set(case.hidden)) == case.chunk
        assert not any(case.vocab in s for s in got["shapes"])  # nothing vocabulary-sized


@pytest.mark.parametrize("w", [3, 2, 1])
def test_zero_counted_tokens_give_zero_loss_and_gradients(runs, w):
    for name in ("all_ignored", "num_items_zero"):
        for _, got in group_results(runs, name, w):
            assert got["loss"].item() == 0.0
            assert not got["gh"].any() and not got["gw"].any() and not got["gb"].any()


@pytest.mark.parametrize("w", [3, 2, 1])
def test_a_label_outside_the_vocabulary_raises_on_every_rank(runs, w):
    for _, got in group_results(runs, "error_label_range", w):
        assert got["error"] == "ValueError"
        assert "outside [0, 37)" in got["message"]


@pytest.mark.parametrize("w", [3, 2, 1])
def test_a_bad_shard_on_one_rank_raises_on_every_rank(runs, w):
    for r, got in group_results(runs, "error_rows", w):
        if r == w - 1:
            assert got["error"] == "ValueError"
            assert "same vocabulary rows" in got["message"]
        else:
            assert got["error"] == "RuntimeError"
            assert f"group rank(s) [{w - 1}]" in got["message"]


@pytest.mark.parametrize("w", [3, 2])
def test_keywords_that_differ_between_ranks_raise_on_every_rank(runs, w):
    for _, got in group_results(runs, "error_kwargs", w):
        assert got["error"] == "ValueError"
        assert "temperature must be the same on every rank" in got["message"]


@pytest.mark.parametrize("w", [3, 2, 1])
def test_teacher_bias_with_a_quantized_teacher_is_a_value_error(runs, w):
    for _, got in group_results(runs, "error_bias_with_module", w):
        assert got["error"] == "ValueError"
        assert "teacher_bias_shard must be None" in got["message"]


def test_the_loss_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        qdist.fused_linear_distillation_loss(x, torch.randn(3, 4), x, torch.randn(3, 4), alpha=1.0)


# ------------------------------------------------------------------ tests: data parallel


_ONE_PROCESS: dict = {}


def one_process() -> dict:
    """STEPS on the global batch in this process (mean over all its counted tokens)."""
    if not _ONE_PROCESS:
        model = student()
        losses = train(model, model, dp_data())
        mods = quantized(model)
        _ONE_PROCESS.update(
            losses=losses,
            params={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            packed={n: m._layout is not None for n, m in mods.items()},
            weights={n: m.dequantize() for n, m in mods.items()},
        )
    return _ONE_PROCESS


@pytest.mark.parametrize("mode", DP_MODES)
def test_data_parallel_training_matches_one_process_on_the_global_batch(runs, mode):
    ref = one_process()
    got = [runs[r][mode] for r in range(WORLD)]
    if "skip" in got[0]:
        pytest.skip(got[0]["skip"])
    # the ranks count different numbers of tokens, so a per-rank mean would be wrong
    assert len({g["count"] for g in got}) == WORLD
    for step in range(STEPS):  # each rank's loss is its share of the global mean
        assert_close(
            torch.tensor(sum(g["losses"][step] for g in got)), torch.tensor(ref["losses"][step])
        )
    for g in got:
        assert g["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            assert_close(g["params"][name], p)
        # the quantized weights: frozen, the same on every rank (packed: the next test)
        for name, w in ref["weights"].items():
            assert torch.equal(g["weights"][name], w)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_quantized_modules_pack_again_after_a_state_dict(runs, mode):
    """A state_dict() unpacks the modules; nothing DDP (with ddp_ignore_quantized_buffers) or
    FSDP2 keeps may stop them packing again (they would repack on every call and warn)."""
    for r in range(WORLD):
        got = runs[r][mode]
        if "skip" in got:
            pytest.skip(got["skip"])
        assert got["warnings"] == []
        assert got["packed"] == one_process()["packed"]
