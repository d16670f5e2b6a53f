"""Calibration for `quantize_(..., calibration_data=...)`: run the model on the calibration
inputs, collect each target layer's H = XᵀX (fp32) with forward hooks, and quantize the layer
with GPTQ (qtorch.quantizers.gptq), in order, so that every layer is calibrated on the outputs
of the layers already quantized before it.

Order and cost. The model's repeated blocks (the nn.ModuleList / nn.Sequential whose children
hold most target layers: a transformer's layers) are calibrated one block at a time: the
inputs of the first block are captured once (the forward stops there), then each block runs
on its own, on the outputs of the previous, already quantized blocks. Inside a block the
target layers form groups in call order, the layers of a group reading the same input tensor
(q/k/v, gate/up): a group's H is one K×K matrix shared by its layers (one H alive at a time);
each pass over the block stops as soon as the group's input is captured. The quantized group
then stands in the block (as a float layer holding ŵ), and the next group is captured; the
block's submodules with nothing left to calibrate are served from a memo in the later passes
(_Memo: only for bit-equal, unmodified arguments), so each pass computes only what changed.
H = XᵀX is accumulated on and below the diagonal (_gram_) and mirrored once. Layers
outside the blocks (e.g. a pooler, an LM head) are done the same way with whole-model passes;
so is every layer of a model without blocks.

AWQ (Int4WeightOnlyConfig(awq=True), with any algorithm): before a group is quantized, its
input channels are scaled by s (qtorch.quantizers.awq.search_scale, from the group's H and
mean |x|) and 1/s is folded into a producer of the input: the norm whose output is that very
tensor (weight, and bias, divided by s), or the rows of a layer already quantized that was
called before (its stand-in's rows, and at the end its scales and bias, divided by s: exact on
the grid). A fold is kept only if, on the first calibration batch, the group's outputs with
the scaled weights and the region's output are unchanged (relative 1e-4 in fp32): that rejects
norms whose output has other uses (post-LN residuals), paths through non-linearities (gate
through SiLU, GELU), norms of another form (x·(1 + w)). Rejected folds are undone; kept norm
folds are undone too if quantize_ fails.

The model runs in eval mode under no_grad with `config.use_cache = False` (transformers) and
is left as it was found: original layers in place (quantize_ swaps in the results), training
flags and use_cache restored, no hooks.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from qtorch import quantizers
from qtorch.quantizers import awq
from qtorch.quantizers.grid import Grid, from_storage

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")

# Bytes of tensors the per-block memo of finished submodules' outputs may hold (_Memo).
MEMO_BYTES = 1 << 30


def _gram_(h: Tensor, x: Tensor, parts: int = 3) -> None:
    """h += xᵀx, computed on and below the diagonal only (for K ≥ 384, in `parts` row panels:
    2/3 of the multiply-adds at three); the entries above the diagonal blocks are left stale
    until _symmetric."""
    k = x.shape[1]
    if k < 384:
        h.addmm_(x.t(), x)
        return
    e = [k * i // parts for i in range(parts + 1)]
    for i in range(parts):
        h[e[i] : e[i + 1], : e[i + 1]].addmm_(x[:, e[i] : e[i + 1]].t(), x[:, : e[i + 1]])


def _symmetric(h: Tensor) -> Tensor:
    """The symmetric matrix of h's lower triangle."""
    return torch.tril(h) + torch.tril(h, -1).t()


class _Stop(BaseException):
    """Raised by a hook to end a calibration forward early (BaseException: no `except
    Exception` in model code swallows it)."""


def call_model(model: nn.Module, batch):
    """API.md: a Tensor is called as model(t), a tuple as model(*t), a dict as model(**t)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, tuple):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        "calibration_data must yield Tensors, tuples or dicts of model inputs, got "
        f"{type(batch).__name__}"
    )


def _run(fn: Callable[[], object]):
    try:
        return fn()
    except _Stop:
        return None


class _PlainProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, k: int) -> None:
        self.n += k
        end = "\n" if self.n >= self.total else ""
        print(f"\r{self.desc}: {self.n}/{self.total} layers", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="layer")


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["input"]


def _hidden_of(out):
    """The hidden states a block returns: the tensor, or the first item of a tuple / model
    output (older transformers layers return tuples)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"cannot find the hidden states in a block's output ({type(out).__name__})")


def _split_hidden(args: tuple, kwargs: dict):
    """(hidden, rest_args, kwargs) of a block call, the hidden states being the first
    positional argument or the `hidden_states` keyword."""
    kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
    if args:
        return args[0], args[1:], kwargs
    hidden = kwargs.pop("hidden_states")
    return hidden, (), kwargs


def _same_extras(a, b) -> bool:
    (ra, ka), (rb, kb) = a, b
    return (
        len(ra) == len(rb)
        and all(x is y for x, y in zip(ra, rb))
        and ka.keys() == kb.keys()
        and all(ka[k] is kb[k] for k in ka)
    )


def _tensors(obj):
    """The tensors in a (nested) call argument or output."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


def _snapshot(obj):
    """What _unchanged compares against later: tensors with their version counters."""
    if isinstance(obj, Tensor):
        return (obj, obj._version)
    if isinstance(obj, (tuple, list)):
        return type(obj), tuple(_snapshot(o) for o in obj)
    if isinstance(obj, Mapping):
        return dict, tuple((k, _snapshot(v)) for k, v in obj.items())
    return obj


def _unchanged(snap) -> bool:
    """The tensors of a snapshot were not modified in place since it was taken."""
    if isinstance(snap, tuple) and len(snap) == 2 and isinstance(snap[0], Tensor):
        return snap[0]._version == snap[1]
    if isinstance(snap, tuple) and len(snap) == 2 and snap[0] in (tuple, list, dict):
        return all(_unchanged(v if snap[0] is not dict else v[1]) for v in snap[1])
    return True


def _same_value(snap, obj) -> bool:
    """obj equals the snapshot's object bit for bit (tensors: same dtype, shape, device and
    values; NaN never matches; other leaves: identical or ==)."""
    if isinstance(snap, tuple) and len(snap) == 2 and isinstance(snap[0], Tensor):
        t, ver = snap
        if not isinstance(obj, Tensor) or t._version != ver:
            return False
        if obj is t:
            return True
        return (
            obj.dtype == t.dtype
            and obj.shape == t.shape
            and obj.device == t.device
            and bool(torch.equal(obj, t))
        )
    if isinstance(snap, tuple) and len(snap) == 2 and snap[0] in (tuple, list, dict):
        kind, items = snap
        if kind is dict:
            if not isinstance(obj, Mapping) or list(obj.keys()) != [k for k, _ in items]:
                return False
            return all(_same_value(v, obj[k]) for k, v in items)
        if not isinstance(obj, (tuple, list)) or len(obj) != len(items):
            return False
        return all(_same_value(v, o) for v, o in zip(items, obj))
    if obj is snap:
        return True
    if isinstance(snap, (bool, int, float, str, type(None))) and type(obj) is type(snap):
        return obj == snap
    return False


class _Memo:
    """Outputs of the block's finished submodules, per calibration batch, across the passes
    over one block. The passes of a block (one per layer group, then one for its output)
    recompute everything before the group they capture; a submodule whose target layers are
    all quantized already (a stand-in, or e.g. the attention once o_proj is done) computes
    the same output from the same input in every later pass, so it is served from here.

    An entry is served only when the call's arguments equal the recorded ones bit for bit
    and neither they nor the output were modified in place since (version counters);
    otherwise the module runs again. Entries are kept within `budget` bytes (tensors held
    alive by the memo, each storage counted once, so no recorded address is reused before
    clear()); what does not fit is recomputed. Not seen: a write through `.data`, which
    bypasses version counters (no calibration forward is expected to write activations so)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.batch: int | None = None  # the calibration batch being run, None: no memo
        self.store = True
        self.entries: dict = {}
        self.held: set = set()
        self.bytes = 0
        self.hits = 0

    def clear(self) -> None:
        self.entries.clear()
        self.held.clear()
        self.bytes = 0

    def forget(self, ids: set[int]) -> None:
        """Drop the entries of the modules of these ids (their bytes stay counted until
        clear())."""
        for key in [key for key in self.entries if key[0] in ids]:
            del self.entries[key]

    def call(self, mod: nn.Module, fn: Callable, args: tuple, kwargs: dict):
        b = self.batch
        if b is None:
            return fn(*args, **kwargs)
        key = (id(mod), b)
        hit = self.entries.get(key)
        if hit is not None:
            snap_in, snap_out = hit
            if _same_value(snap_in, (args, kwargs)) and _unchanged(snap_out):
                self.hits += 1
                return snap_out[0] if _single(snap_out) else _restore(snap_out)
            del self.entries[key]  # stale: its bytes stay counted until clear()
        out = fn(*args, **kwargs)
        if self.store and _memoizable(out):
            new = []
            for t in (*_tensors((args, kwargs)), *_tensors(out)):
                ptr = (t.untyped_storage().data_ptr(), t.device)
                if ptr not in self.held:
                    new.append((ptr, t.untyped_storage().nbytes()))
            size = sum(n for _, n in dict(new).items())
            if self.bytes + size <= self.budget:
                self.held.update(p for p, _ in new)
                self.bytes += size
                self.entries[key] = (_snapshot((args, kwargs)), _snapshot(out))
        return out


def _memoizable(out) -> bool:
    """Outputs the memo rebuilds exactly: a tensor, or a tuple / list of tensors and Nones."""
    if isinstance(out, Tensor):
        return True
    return type(out) in (tuple, list) and all(o is None or isinstance(o, Tensor) for o in out)


def _single(snap) -> bool:
    return isinstance(snap, tuple) and len(snap) == 2 and isinstance(snap[0], Tensor)


def _restore(snap):
    """The object a snapshot was taken of (the same tensors, the containers rebuilt)."""
    if _single(snap):
        return snap[0]
    if isinstance(snap, tuple) and len(snap) == 2 and snap[0] in (tuple, list, dict):
        kind, items = snap
        if kind is dict:
            return {k: _restore(v) for k, v in items}
        return kind(_restore(v) for v in items)
    return snap


def _has_channels(mod: nn.Module, k: int | None = None) -> bool:
    """mod has a 1-D float `weight` (of k entries if given): a norm's per-channel scale."""
    w = getattr(mod, "weight", None)
    return (
        isinstance(w, Tensor)
        and w.dim() == 1
        and w.is_floating_point()
        and (k is None or w.numel() == k)
    )


def _channel_param(p, s: Tensor) -> bool:
    return isinstance(p, Tensor) and p.dim() == 1 and p.numel() == s.numel()


class _Calibration:
    def __init__(
        self,
        model: nn.Module,
        targets: list[nn.Linear],
        grid: Grid,
        cls,
        init_kw: dict,
        data: list,
        algorithm: str = "gptq",
        awq: bool = False,
    ) -> None:
        self.model, self.grid, self.cls, self.init_kw, self.data = model, grid, cls, init_kw, data
        self.algorithm, self.awq = algorithm, awq
        # AWQ folds: (parameter, its value before) of every norm weight / bias divided by s,
        # to put back if quantize_ fails; the row divisors of already quantized layers (by
        # id of the original linear), applied to their buffers when the modules are built
        self.folded: list[tuple[Tensor, Tensor]] = []
        self.row_div: dict[int, Tensor] = {}
        self.orig_of: dict[int, nn.Linear] = {}
        self.awq_scaled: list[tuple[str, str, Tensor]] = []  # (group, producer, s)
        self.targets = targets
        self.target_ids = {id(t) for t in targets}
        self.names: dict[int, list[str]] = {}
        for fqn, mod in model.named_modules(remove_duplicate=False):
            if id(mod) in self.target_ids:
                self.names.setdefault(id(mod), []).append(fqn)
        self.result: dict[int, nn.Module] = {}
        self.uncalibrated: list[str] = []
        self.bar = None
        self.memo = _Memo(MEMO_BYTES)
        self.stand_ins: set[int] = set()
        self.wrapped: list[tuple[nn.Module, Callable | None]] = []

    # -- the layers ------------------------------------------------------------------------
    def _swap(self, old: nn.Module, new: nn.Module) -> None:
        for fqn in self.names[id(old)]:
            if not fqn:
                continue  # the root itself (quantize_ returns the new module)
            parent_name, _, child = fqn.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, new)

    def _quantize_group(
        self, group: list[nn.Linear], h: Tensor | None, awq_info=None, run=None
    ) -> None:
        """The group's weights stacked along N (the rows are independent given H) quantized
        by the algorithm (GPTQ needs H), after AWQ scaling when asked for and a producer of
        the input takes it (_fold); the buffers kept for the modules built at the end, a float
        stand-in holding ŵ swapped into the model."""
        dev = group[0].weight.device
        w = torch.cat([lin.weight.detach().to(dev, torch.float32) for lin in group])
        names = ", ".join(self.names[id(lin)][0] for lin in group)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"quantize_: the weight of {names} holds NaN or inf; GPTQ needs finite weights"
            )
        if h is not None:
            h = h.to(dev)
            if not bool(torch.isfinite(h).all()):
                raise ValueError(
                    f"quantize_: the inputs of {names} on the calibration_data hold NaN or inf "
                    "(or overflow float32 in XᵀX); GPTQ needs finite inputs"
                )
        if awq_info is not None and h is not None:
            x_absmean, candidates = awq_info
            # the error weighed with the ranges the algorithm will use (GPTQ's static groups
            # come from the MSE search)
            s, _ = awq.search_scale(
                self.grid, w, h, x_absmean.to(dev), use_mse=self.algorithm != "rtn"
            )
            producer = None if s is None else self._fold(group, s, candidates, run)
            if producer is not None:
                w = w * s
                h = h / s[:, None] / s[None, :]
                self.awq_scaled.append((names, producer, s))
        bufs = quantizers.quantize_weight(self.grid, w, self.algorithm, h)
        del w, h
        w_hat = from_storage(self.grid, bufs)
        r0 = 0
        for lin in group:
            r1 = r0 + lin.out_features
            self.result[id(lin)] = (lin, {k: v[r0:r1].clone() for k, v in bufs.items()})
            with torch.device("meta"):
                stand_in = nn.Linear(lin.in_features, lin.out_features, bias=False)
            stand_in.weight = nn.Parameter(w_hat[r0:r1].to(lin.weight.dtype), requires_grad=False)
            stand_in.bias = lin.bias
            self.stand_ins.add(id(stand_in))
            self.orig_of[id(stand_in)] = lin
            self._swap(lin, stand_in)
            r0 = r1
        self.bar.update(len(group))

    def _build(self) -> dict[int, nn.Module]:
        """The quantized modules, the AWQ row divisors applied to their scales and bias."""
        out = {}
        for key in list(self.result):
            lin, own = self.result.pop(key)
            src = lin
            d = self.row_div.get(key)
            if d is not None:
                d = d.to(lin.weight.device)
                for name in ("scales", "weight_scale"):
                    if name in own:
                        own[name] = own[name] / (d[:, None] if own[name].dim() == 2 else d)
                with torch.device("meta"):
                    src = nn.Linear(lin.in_features, lin.out_features, bias=False)
                src.weight = lin.weight
                if lin.bias is not None:
                    src.bias = nn.Parameter(
                        (lin.bias.detach().float() / d).to(lin.bias.dtype),
                        requires_grad=lin.bias.requires_grad,
                    )
            out[key] = self.cls._from_quantized(src, own, **self.init_kw)
        return out

    # -- AWQ: fold 1/s into the producer of a group's input ---------------------------------
    def _fold(self, group: list[nn.Linear], s: Tensor, candidates: list, run) -> str | None:
        """Divide the group's input by s through one of its candidate producers (a norm whose
        weight (and bias) is divided by s, or an already quantized layer whose rows are), the
        group's columns multiplied by s, and keep the first fold under which the region's
        output on the first calibration batch is unchanged (an exact re-parametrisation: this
        rejects producers whose output has other uses, non-linear paths, norms of another
        form). The kept producer's name, or None (the model as before)."""
        outs: list[list[Tensor]] = [[], []]

        def hook(i):
            def fn(mod, args, out):
                outs[i].append(out)

            return fn

        hds = [lin.register_forward_hook(hook(0)) for lin in group]
        try:
            ref = _hidden_of(run(0))
        except TypeError:  # an output without a tensor to compare: no check, no fold
            return None
        finally:
            for hd in hds:
                hd.remove()
        tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2

        def close(a: Tensor, b: Tensor) -> bool:
            err = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)
            return bool(torch.isfinite(err)) and float(err) <= tol

        scaled = []
        for lin in group:
            with torch.device("meta"):
                t = nn.Linear(lin.in_features, lin.out_features, bias=False)
            sw = lin.weight.detach().float() * s.to(lin.weight.device)
            t.weight = nn.Parameter(sw.to(lin.weight.dtype), requires_grad=False)
            t.bias = lin.bias
            scaled.append(t)
            self._swap(lin, t)
        # the memo entries the folds and the swaps make stale: those of the producers, the
        # group's stand-ins and every module above them (a parent may be memoized while the
        # scaled copies stand in, its pending layers then looking finished)
        stale = {id(t) for t in scaled}
        for fqn in [self.names[id(lin)][0] for lin in group] + [
            n for n, m in self.model.named_modules() if any(m is c for _, c in candidates)
        ]:
            parts = fqn.split(".") if fqn else []
            for i in range(len(parts) + 1):
                stale.add(id(self.model.get_submodule(".".join(parts[:i]))))
        stale.update(id(c) for _, c in candidates)
        kept = None
        try:
            for kind, mod in candidates:
                undo = self._apply_fold(kind, mod, s)
                self.memo.forget(stale)
                outs[1] = []
                hds = [t.register_forward_hook(hook(1)) for t in scaled]
                try:
                    out = _hidden_of(run(0))
                finally:
                    for hd in hds:
                        hd.remove()
                # the group's own outputs (X/s)(W·s)ᵀ = XWᵀ, each to its own size, and the
                # region's output (the producer's output may have other uses)
                if (
                    len(outs[1]) == len(outs[0])
                    and all(close(a, b) for a, b in zip(outs[1], outs[0]))
                    and close(out, ref)
                ):
                    if kind == "rows":
                        orig = self.orig_of[id(mod)]
                        prev = self.row_div.get(id(orig))
                        self.row_div[id(orig)] = s if prev is None else prev * s
                        kept = self.names[id(orig)][0]
                    else:
                        kept = next(
                            (n for n, m in self.model.named_modules() if m is mod), "<norm>"
                        )
                    break
                undo()
                self.memo.forget(stale)
        finally:
            for lin in group:
                self._swap(lin, lin)
            self.memo.forget(stale)
        return kept

    def _apply_fold(self, kind: str, mod: nn.Module, s: Tensor):
        """Divide mod's output channels by s; returns the undo."""
        if kind == "norm":
            params = [p for p in (mod.weight, getattr(mod, "bias", None)) if _channel_param(p, s)]
            olds = [p.detach().clone() for p in params]
            for p in params:
                p.data.copy_((p.detach().float() / s.to(p.device)).to(p.dtype))
            records = list(zip(params, olds))
            self.folded.extend(records)

            def undo():  # right after the apply: its records are the list's last
                for p, o in records:
                    p.data.copy_(o)
                if records:
                    del self.folded[-len(records) :]

            return undo
        # rows of a stand-in (its weight is ours; its bias is the original's: replaced)
        old_w, old_b = mod.weight, mod.bias
        sd = s.to(old_w.device)
        mod.weight = nn.Parameter(
            (old_w.detach().float() / sd[:, None]).to(old_w.dtype), requires_grad=False
        )
        if old_b is not None:
            mod.bias = nn.Parameter(
                (old_b.detach().float() / sd).to(old_b.dtype), requires_grad=old_b.requires_grad
            )

        def undo_rows():
            mod.weight, mod.bias = old_w, old_b

        return undo_rows

    def restore_folds(self) -> None:
        for p, o in reversed(self.folded):
            p.data.copy_(o)
        self.folded.clear()

    # -- one region: a block, or the whole model --------------------------------------------
    def _capture_group(self, run: Callable[[int], None], pending: list[nn.Linear]):
        """(group, H, awq_info): the first pending layer called and those called right after
        it on the same input tensor; H = Σ XᵀX of that input over all calibration batches;
        with AWQ, awq_info = (mean |x| per input channel, the candidate producers of the
        input: [("norm", module) whose output is that very tensor, ("rows", stand-in) of
        already quantized layers of out_features K called before, the latest first])."""
        state: dict = {"x": None, "group": [], "h": None, "abs": None, "rows": 0}
        calls: list = []  # (module, output) of the discovery pass, in call order

        def add(x: Tensor) -> None:
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            if state["h"] is None:
                state["h"] = torch.zeros(xf.shape[1], xf.shape[1], device=xf.device)
                if self.awq:
                    state["abs"] = torch.zeros(xf.shape[1], device=xf.device)
            _gram_(state["h"], xf)
            if self.awq:
                state["abs"] += xf.abs().sum(0)
                state["rows"] += xf.shape[0]

        def discover(mod, args, kwargs):
            x = _input_of(args, kwargs)
            if state["x"] is None:
                state["x"] = x
                state["group"].append(mod)
                add(x)
            elif x is state["x"] and mod not in state["group"]:
                state["group"].append(mod)
            else:
                raise _Stop

        def record(mod, args, out):
            if state["x"] is None and isinstance(out, Tensor):
                calls.append((mod, out))

        def accumulate(mod, args, kwargs):
            add(_input_of(args, kwargs))
            raise _Stop

        handles = [m.register_forward_pre_hook(discover, with_kwargs=True) for m in pending]
        if self.awq:
            handles += [
                m.register_forward_hook(record)
                for m in self.model.modules()
                if id(m) in self.stand_ins or (not isinstance(m, nn.Linear) and _has_channels(m))
            ]
        try:
            run(0)
        finally:
            for hd in handles:
                hd.remove()
        if not state["group"]:
            return [], None, None
        candidates = []
        if self.awq:
            x, k = state["x"], state["x"].shape[-1]
            norms = [("norm", m) for m, out in reversed(calls) if out is x and _has_channels(m, k)]
            rows = [
                ("rows", m)
                for m, _ in reversed(calls)
                if id(m) in self.stand_ins and m.out_features == k
            ]
            candidates = norms[:1] + rows[:2]
        state["x"] = None
        calls.clear()
        hd = state["group"][0].register_forward_pre_hook(accumulate, with_kwargs=True)
        try:
            for b in range(1, len(self.data)):
                run(b)
        finally:
            hd.remove()
        awq_info = (state["abs"] / max(state["rows"], 1), candidates) if self.awq else None
        return state["group"], _symmetric(state["h"]), awq_info

    def _region(self, run: Callable[[int], None], pending: list[nn.Linear]) -> None:
        pending = list(pending)
        while pending:
            group, h, awq_info = self._capture_group(run, pending)
            if not group:  # the calibration data never reaches these
                for lin in pending:
                    self.uncalibrated.append(self.names[id(lin)][0])
                    self._quantize_group([lin], None)
                return
            self._quantize_group(group, h, awq_info, run)
            del h
            ids = {id(g) for g in group}
            pending = [p for p in pending if id(p) not in ids]

    def _model_region(self, pending: list[nn.Linear]) -> None:
        if pending:
            self._region(lambda b: _run(lambda: call_model(self.model, self.data[b])), pending)

    # -- blocks -----------------------------------------------------------------------------
    def _find_blocks(self):
        """(fqn, container) of the ModuleList / Sequential whose children hold the most target
        layers (at least two children holding some), or None."""
        best = None
        for fqn, mod in self.model.named_modules():
            if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
                continue
            counts = [sum(id(m) in self.target_ids for m in child.modules()) for child in mod]
            if sum(c > 0 for c in counts) >= 2 and (best is None or sum(counts) > best[0]):
                best = (sum(counts), fqn, mod)
        return None if best is None else best[1:]

    def _block_inputs(self, blocks):
        """Per batch: the first block's hidden states, and each block's other arguments; None
        if the blocks are not a chain (block i + 1 reading block i's output)."""
        hidden, extras = [], []
        for b in range(len(self.data)):
            rec: dict = {"pre": {}, "out0": None}

            def pre(i):
                def hook(mod, args, kwargs):
                    rec["pre"][i] = (args, kwargs)
                    if i == 1 and not rec.get("full"):
                        raise _Stop

                return hook

            def post0(mod, args, out):
                rec["out0"] = out

            hs = [
                blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True)
                for i in range(len(blocks))
            ]
            hs.append(blocks[0].register_forward_hook(post0))
            try:
                _run(lambda: call_model(self.model, self.data[b]))
                if 0 not in rec["pre"] or 1 not in rec["pre"]:
                    return None
                h0, *e0 = _split_hidden(*rec["pre"][0])
                h1, *e1 = _split_hidden(*rec["pre"][1])
                if h1 is not _hidden_of(rec["out0"]):
                    return None
                if _same_extras(e0, e1):
                    per_block = [tuple(e0)] * len(blocks)
                else:  # per-layer arguments (e.g. alternating attention masks): all of them
                    rec["full"], rec["pre"] = True, {}
                    _run(lambda: call_model(self.model, self.data[b]))
                    if len(rec["pre"]) != len(blocks):
                        return None
                    per_block = [
                        tuple(_split_hidden(*rec["pre"][i])[1:]) for i in range(len(blocks))
                    ]
            finally:
                for hd in hs:
                    hd.remove()
            hidden.append(h0)
            extras.append(per_block)
        return hidden, extras

    def run(self) -> dict[int, nn.Module]:
        self.bar = _progress(
            len(self.targets), f"qtorch {self.algorithm}" + ("+awq" if self.awq else "")
        )
        try:
            found = self._find_blocks()
            order = {id(m): i for i, m in enumerate(self.model.modules())}
            if found is not None:
                fqn, blocks = found
                first = order[id(blocks)]
                inside = {id(m) for m in blocks.modules()}
                pre = [t for t in self.targets if id(t) not in inside and order[id(t)] < first]
                post = [t for t in self.targets if id(t) not in inside and order[id(t)] > first]
                self._model_region(pre)
                inputs = self._block_inputs(blocks)
                if inputs is None:  # not a chain of blocks: whole-model passes for all
                    self._model_region([t for t in self.targets if id(t) not in self.result])
                    return self._build()
                self._blocks(blocks, *inputs)
                self._model_region(post)
            else:
                self._model_region(self.targets)
            return self._build()
        finally:
            self.bar.close()

    # -- the memo of finished submodules ---------------------------------------------------
    def _finished(self, block: nn.Module) -> None:
        """Route the calls of the block's finished submodules through the memo: every
        submodule holding no target layer that is still to be quantized (stand-ins, norms,
        activations, the attention once its projections are done). Memoizing the cheap ones
        too lets their consumers' arguments be the very tensors recorded (an identity check
        instead of a comparison). The block itself is not memoized (its outputs are needed
        once each)."""
        done = {id(m) for m, _ in self.wrapped}
        for m in block.modules():
            if m is block or id(m) in done:
                continue
            ids = [id(x) for x in m.modules()]
            if any(i in self.target_ids and i not in self.result for i in ids):
                continue  # a layer inside is still to be calibrated: its output will change
            # an instance attribute (accelerate's hooks wrap forward so) is put back as it was
            self.wrapped.append((m, m.__dict__.get("forward")))
            m.forward = self._memoized(m, m.forward)

    def _memoized(self, mod: nn.Module, fn: Callable) -> Callable:
        def forward(*args, **kwargs):
            return self.memo.call(mod, fn, args, kwargs)

        return forward

    def _unwrap(self) -> None:
        for m, own in reversed(self.wrapped):
            if own is not None:
                m.forward = own
            elif "forward" in m.__dict__:
                del m.forward
        self.wrapped.clear()
        self.memo.clear()
        self.memo.batch = None

    def _blocks(self, blocks, hidden: list, extras: list) -> None:
        in_block = [[m for m in block.modules() if id(m) in self.target_ids] for block in blocks]
        last = max(i for i, t in enumerate(in_block) if t)
        for i in range(last + 1):

            def call(b, i=i):
                rest, kwargs = extras[b][i]
                self._finished(blocks[i])
                self.memo.batch = b
                # blocks[i], not a reference taken earlier: a block that is itself a target
                # layer is replaced by its stand-in
                return blocks[i](hidden[b], *rest, **kwargs)

            try:
                if in_block[i]:
                    self._region(lambda b, call=call: _run(lambda: call(b)), in_block[i])
                if i < last:
                    self.memo.store = False  # the block's last pass: nothing comes after it
                    for b in range(len(self.data)):
                        hidden[b] = _hidden_of(call(b))
            finally:
                self.memo.store = True
                self._unwrap()


def gptq(
    model: nn.Module,
    targets: list[nn.Linear],
    grid: Grid,
    cls,
    init_kw: dict,
    calibration_data: Iterable,
    algorithm: str = "gptq",
    awq: bool = False,
) -> dict[int, nn.Module]:
    """id(linear) -> its quantized module (`cls`, canonical storage on `grid`), for every
    linear of `targets` (distinct modules of `model`), by `algorithm` (GPTQ) in order
    (module docstring). With `awq`, each group is first scaled per input channel
    (qtorch.quantizers.awq) where a producer of its input can take 1/s exactly (_fold): the
    norms' weights of such groups are then divided by s (the model computes the same
    function); any other change is undone. The model is otherwise left as found."""
    data = list(calibration_data)
    if not data:
        raise ValueError(
            "calibration_data is empty: calibration needs at least one batch of inputs"
        )
    cal = _Calibration(model, targets, grid, cls, init_kw, data, algorithm, awq)
    modes = {m: m.training for m in model.modules()}
    caches = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None):
            caches.append(cfg)
    originals = {id(t): t for t in targets}
    try:
        model.eval()
        for cfg in caches:
            cfg.use_cache = False
        with torch.no_grad():
            try:
                result = cal.run()
            except BaseException:
                cal.restore_folds()
                raise
    finally:
        for t in originals.values():  # quantize_ swaps the results in
            cal._swap(t, t)
        for cfg in caches:
            cfg.use_cache = True
        for m, training in modes.items():
            m.training = training
    if cal.uncalibrated:
        warnings.warn(
            "quantize_: the calibration data never reached "
            + ", ".join(cal.uncalibrated)
            + (
                ': quantized with algorithm="mse" instead of GPTQ'
                if algorithm == "gptq"
                else ": quantized without AWQ scaling"
            ),
            UserWarning,
            stacklevel=3,
        )
    if awq and not cal.awq_scaled:
        warnings.warn(
            "quantize_: awq=True found no layer group whose input producer (a norm, or the "
            "layer before) takes the scaling exactly; the layers were quantized unscaled",
            UserWarning,
            stacklevel=3,
        )
    return result
