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
then stands in the block (as a float layer holding ŵ), and the next group is captured. Layers
outside the blocks (e.g. a pooler, an LM head) are done the same way with whole-model passes;
so is every layer of a model without blocks.

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
from qtorch.quantizers.grid import Grid, from_storage

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


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


class _Calibration:
    def __init__(
        self, model: nn.Module, targets: list[nn.Linear], grid: Grid, cls, init_kw: dict, data: list
    ) -> None:
        self.model, self.grid, self.cls, self.init_kw, self.data = model, grid, cls, init_kw, data
        self.targets = targets
        self.target_ids = {id(t) for t in targets}
        self.names: dict[int, list[str]] = {}
        for fqn, mod in model.named_modules(remove_duplicate=False):
            if id(mod) in self.target_ids:
                self.names.setdefault(id(mod), []).append(fqn)
        self.result: dict[int, nn.Module] = {}
        self.uncalibrated: list[str] = []
        self.bar = None

    # -- the layers ------------------------------------------------------------------------
    def _swap(self, old: nn.Module, new: nn.Module) -> None:
        for fqn in self.names[id(old)]:
            if not fqn:
                continue  # the root itself (quantize_ returns the new module)
            parent_name, _, child = fqn.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, new)

    def _quantize_group(self, group: list[nn.Linear], h: Tensor | None) -> None:
        """GPTQ on the group's weights stacked along N (the rows are independent given H),
        the modules kept for quantize_, a float stand-in holding ŵ swapped into the model."""
        dev = group[0].weight.device
        w = torch.cat([lin.weight.detach().to(dev, torch.float32) for lin in group])
        if h is not None:
            h = h.to(dev)
        bufs = quantizers.quantize_weight(self.grid, w, "gptq", h)
        del w, h
        w_hat = from_storage(self.grid, bufs)
        r0 = 0
        for lin in group:
            r1 = r0 + lin.out_features
            own = {k: v[r0:r1].clone() for k, v in bufs.items()}
            self.result[id(lin)] = self.cls._from_quantized(lin, own, **self.init_kw)
            with torch.device("meta"):
                stand_in = nn.Linear(lin.in_features, lin.out_features, bias=False)
            stand_in.weight = nn.Parameter(w_hat[r0:r1].to(lin.weight.dtype), requires_grad=False)
            stand_in.bias = lin.bias
            self._swap(lin, stand_in)
            r0 = r1
        self.bar.update(len(group))

    # -- one region: a block, or the whole model --------------------------------------------
    def _capture_group(self, run: Callable[[int], None], pending: list[nn.Linear]):
        """(group, H): the first pending layer called and those called right after it on the
        same input tensor; H = Σ XᵀX of that input over all calibration batches."""
        state: dict = {"x": None, "group": [], "h": None}

        def add(x: Tensor) -> None:
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            if state["h"] is None:
                state["h"] = torch.zeros(xf.shape[1], xf.shape[1], device=xf.device)
            state["h"].addmm_(xf.t(), xf)

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

        def accumulate(mod, args, kwargs):
            add(_input_of(args, kwargs))
            raise _Stop

        handles = [m.register_forward_pre_hook(discover, with_kwargs=True) for m in pending]
        try:
            run(0)
        finally:
            for hd in handles:
                hd.remove()
        if not state["group"]:
            return [], None
        state["x"] = None
        hd = state["group"][0].register_forward_pre_hook(accumulate, with_kwargs=True)
        try:
            for b in range(1, len(self.data)):
                run(b)
        finally:
            hd.remove()
        return state["group"], state["h"]

    def _region(self, run: Callable[[int], None], pending: list[nn.Linear]) -> None:
        pending = list(pending)
        while pending:
            group, h = self._capture_group(run, pending)
            if not group:  # the calibration data never reaches these
                for lin in pending:
                    self.uncalibrated.append(self.names[id(lin)][0])
                    self._quantize_group([lin], None)
                return
            self._quantize_group(group, h)
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
        self.bar = _progress(len(self.targets), "qtorch gptq")
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
                    return self.result
                self._blocks(blocks, *inputs)
                self._model_region(post)
            else:
                self._model_region(self.targets)
            return self.result
        finally:
            self.bar.close()

    def _blocks(self, blocks, hidden: list, extras: list) -> None:
        in_block = [[m for m in block.modules() if id(m) in self.target_ids] for block in blocks]
        last = max(i for i, t in enumerate(in_block) if t)
        for i in range(last + 1):

            def call(b, i=i):
                rest, kwargs = extras[b][i]
                # blocks[i], not a reference taken earlier: a block that is itself a target
                # layer is replaced by its stand-in
                return blocks[i](hidden[b], *rest, **kwargs)

            if in_block[i]:
                self._region(lambda b, call=call: _run(lambda: call(b)), in_block[i])
            if i < last:
                for b in range(len(self.data)):
                    hidden[b] = _hidden_of(call(b))


def gptq(
    model: nn.Module,
    targets: list[nn.Linear],
    grid: Grid,
    cls,
    init_kw: dict,
    calibration_data: Iterable,
) -> dict[int, nn.Module]:
    """id(linear) -> its quantized module (`cls`, canonical storage on `grid`), for every
    linear of `targets` (distinct modules of `model`), by GPTQ in order (module docstring).
    The model is left as found."""
    data = list(calibration_data)
    if not data:
        raise ValueError("calibration_data is empty: GPTQ needs at least one batch of inputs")
    cal = _Calibration(model, targets, grid, cls, init_kw, data)
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
            result = cal.run()
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
            + ': quantized with algorithm="mse" instead of GPTQ',
            UserWarning,
            stacklevel=3,
        )
    return result
