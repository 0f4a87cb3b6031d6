"""Bidirectional Mamba mixer of Vision Mamba ("bimamba v2" with divided output).

One ``in_proj`` produces x and z; a forward branch and a backward branch (own conv, x_proj, dt_proj,
A, D) scan the sequence and its flip; the outputs are averaged (or summed, ``divide_out=False``, as in
VideoMamba) and projected back. The branches call :mod:`rmeeto.ops`, which picks the CUDA, fused-CPU or
pure-PyTorch backend. The backward branch asks the ops for a reverse conv and scan, so on the CPU kernels
nothing is flipped or copied: x, z, the conv output, Δ and y stay token-major (B×L×Dᵢ memory) between the
matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from rmeeto.ops import (
    InnerParams,
    add_rms_norm_cpu,
    block_cpu,
    causal_conv1d,
    cpu_block_inputs,
    delta_record,
    fused_add_norm,
    fused_block_cpu,
    fused_inner,
    fused_inner_cpu,
    fused_mixer_cpu,
    mamba_inner,
    mamba_inner_cpu,
    mamba_inner_cpu_grad,
    mixer_cpu,
    prepare_inner,
    selective_scan,
)
from rmeeto.ops.common import wants_grad
from rmeeto.ops.packed import PackedLinear
from rmeeto.ops.workspace import Workspace, hold, reuse


@dataclass
class ScanRecord:
    """Per-token SSM quantities of one mixer call, all in sequence order (the backward branch's too).

    delta: pair (forward, backward) of B×Dᵢ×L timescales after bias and softplus.
    B, C: pair (forward, backward) of B×N×L input/output matrices.
    """

    delta: tuple[Tensor, Tensor]
    B: tuple[Tensor, Tensor]
    C: tuple[Tensor, Tensor]


@dataclass
class Prepared:
    """A mixer's parameters laid out for a forward without gradients: in_proj's halves and out_proj (the halving
    in it) as PackedLinears (packed for MKL inside frozen()); out_proj's None unless it is a plain nn.Linear
    without hooks (a wrapped or hooked one is called as a module); and mamba_inner_cpu's parameters (made
    when first needed: only the cpu backend, which needs numba, reads them)."""

    in_proj: tuple[PackedLinear, PackedLinear]
    out_proj: PackedLinear | None
    inner: InnerParams | None = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32: ``x / sqrt(mean(x²) + eps) · weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(self.weight.dtype)

    def add_forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """B×N×C → (normed, new residual): the residual stream plus hidden in fp32 (hidden alone when
        residual is None), and this norm of it. One pass of a cpu kernel where it applies (fp32 on the cpu
        backend: :func:`rmeeto.ops.fused_add_norm`; its backward is one pass too), the same values to rounding."""
        if fused_add_norm(hidden, residual, self.weight):
            return add_rms_norm_cpu(hidden, residual, self.weight, self.eps)
        residual = hidden.float() if residual is None else residual + hidden.float()
        return self(residual.to(self.weight.dtype)), residual


class BiMamba(nn.Module):
    """Vim mixer: B×L×C → B×L×C.

    ``divide_out``: average the two directions (Vim) rather than sum them (VideoMamba).
    Set ``record = True`` to keep the per-token Δ, B and C of the last call in ``last_record``
    (used by importance-based token reducers; off by default, costs nothing when off).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        divide_out: bool = True,
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.divide_out = divide_out
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.out_proj = nn.Linear(di, d_model, bias=False)
        for suffix in ("", "_b"):
            self.add_module(f"conv1d{suffix}", nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1))
            self.add_module(f"x_proj{suffix}", nn.Linear(di, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, di, bias=True)
            _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
            self.add_module(f"dt_proj{suffix}", dt_proj)
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1)
            self.register_parameter("A_log" if not suffix else "A_b_log", nn.Parameter(a_log))
            self.register_parameter(f"D{suffix}", nn.Parameter(torch.ones(di)))
        self.record = False
        self.last_record: ScanRecord | None = None
        self._prepared: list | None = None  # see frozen(): [] or [stamp, sources, Prepared]

    def _scan(
        self, x: Tensor, z: Tensor, suffix: str, workspace: Workspace | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One direction on B×Dᵢ×L inputs, all in sequence order (the backward branch, suffix "_b", scans
        from the end) → (y B×Dᵢ×L, Δ-pre-bias B×Dᵢ×L, B B×N×L, C B×N×L). Token-major inputs (B×Dᵢ×L views
        of B×L×Dᵢ memory) stay so all the way, and so does y. Δ goes to the workspace when there is one."""
        conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D = self._direction(suffix)
        reverse = suffix == "_b"
        x = causal_conv1d(x, conv_w, conv_b, activation="silu", reverse=reverse)
        x_dbl = F.linear(x.transpose(1, 2), x_proj_w)  # B×L×(R+2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = _matmul(dt, dt_proj_w, workspace).transpose(1, 2)  # B×Dᵢ×L, bias added inside the scan
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)  # B×N×L views: each backend lays them out as it reads them
        y = selective_scan(x, delta, A, Bm, Cm, D, z=z, delta_bias=dt_bias, delta_softplus=True, reverse=reverse)
        return y, delta, Bm, Cm

    def _direction(self, suffix: str) -> tuple[Tensor, ...]:
        """The parameters of one direction ("" or "_b"): conv weight and bias, x_proj and dt_proj weights,
        Δ bias, A = −exp(A_log), D; fp32 where the scan wants it."""
        return _derive(self._sources(suffix))

    def _laid_out(self) -> Prepared:
        """The parameters laid out for a forward without gradients: at each call, or once inside frozen() (again
        if one of them got new data or changed in place since: its address or version counter moved)."""
        if self._prepared is None:
            return self._lay_out()
        modules = self._modules
        sources = (*self._sources(""), *self._sources("_b"), _parameter(modules["in_proj"], "weight"),
                   _parameter(modules["out_proj"], "weight"))  # fmt: skip
        if not self._prepared or self._prepared[0] != param_stamp(sources):  # sources kept alive: a new parameter
            self._prepared[:] = param_stamp(sources), sources, self._lay_out()  # cannot take a freed one's address
        return self._prepared[2]

    def _lay_out(self) -> Prepared:
        """Packed for MKL inside frozen() only (packing at every call costs more than it saves)."""
        pack = self._prepared is not None
        in_proj = tuple(PackedLinear(w, pack=pack) for w in self.in_proj.weight.chunk(2))
        out = self.out_proj
        plain = type(out) is nn.Linear and out.bias is None and not (out._forward_hooks or out._forward_pre_hooks)
        return Prepared(in_proj, PackedLinear(out.weight, 0.5 if self.divide_out else 1.0, pack) if plain else None)

    def _inner_params(self, laid_out: Prepared) -> InnerParams:
        """Both directions' parameters for mamba_inner_cpu, made once per Prepared."""
        if laid_out.inner is None:
            laid_out.inner = prepare_inner(*(self._direction(s) for s in ("", "_b")), pack=self._prepared is not None)
        return laid_out.inner

    def _sources(self, suffix: str) -> tuple[Tensor | None, ...]:
        """The parameters of one direction as stored (conv weight and bias, x_proj and dt_proj weights, dt_proj
        bias, A_log, D): what _direction derives its tensors from. Read from the modules' parameter dicts, not by
        attribute: through nn.Module.__getattr__, a Python function, a frozen mixer's check of its parameters
        (every forward) took 2.8× as long in a loop, 14.7 against 5.3 µs (docs/cpu_speed.md, round 15)."""
        conv, x_proj, dt_proj, a_log, d = _DIRECTIONS[suffix]
        modules = self._modules
        conv, x_proj, dt_proj = modules[conv], modules[x_proj], modules[dt_proj]
        return (_parameter(conv, "weight"), _parameter(conv, "bias"), _parameter(x_proj, "weight"),
                _parameter(dt_proj, "weight"), _parameter(dt_proj, "bias"), self._parameters[a_log],
                self._parameters[d])  # fmt: skip

    def _forward_fused(self, hidden: Tensor) -> Tensor:
        """mamba-ssm's mamba_inner_fn per direction (the official Vim's bimamba-v2 path): B×L×C → B×L×C.

        xz is built L-contiguous (2Dᵢ × B·L, as the official code does), so nothing is copied on the
        way in; conv and Δ are recomputed in the backward. mamba-ssm ships the inner function with
        out_proj included, so out_proj runs once per direction (linear: same sum up to rounding).
        """
        nb, L, _ = hidden.shape
        xz = (self.in_proj.weight @ hidden.reshape(nb * L, -1).t()).view(-1, nb, L).transpose(0, 1)
        out = []
        for suffix, seq in (("", xz), ("_b", xz.flip(-1))):
            conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D = self._direction(suffix)
            out.append(mamba_inner(seq, conv1d_weight=conv_w, conv1d_bias=conv_b, x_proj_weight=x_proj_w,
                                   delta_proj_weight=dt_proj_w, out_proj_weight=self.out_proj.weight,
                                   out_proj_bias=None, A=A, D=D, delta_bias=dt_bias))
        y = out[0] + out[1].flip(1)
        return y / 2 if self.divide_out else y

    def forward(self, hidden: Tensor) -> Tensor:
        if not self.record and fused_inner(hidden, self.d_conv):
            return self._forward_fused(hidden)
        if not hidden.is_cpu or wants_grad(chain([hidden], self.parameters())):
            return self._forward(hidden, None)  # a graph to record, or not on the CPU
        with reuse() as workspace:  # the temporaries in CPU memory reused from block to block (rmeeto.ops.workspace)
            return self._forward(hidden, workspace)

    def block_forward(self, norm: RMSNorm, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """A Vim block's ``normed, residual = norm.add_forward(hidden, residual)`` then ``(self(normed), residual)``
        as one block_cpu call (frozen_block's), or None where that does not apply."""
        run = self.frozen_block(norm)
        return None if run is None else run(hidden, residual)

    def frozen_block(self, norm: RMSNorm) -> FrozenBlock | None:
        """Inside rmeeto.frozen: the block_forward of ``norm`` and this mixer as one block_cpu call with the same bits
        (a FrozenBlock). None where the block cannot run so at all: outside frozen, with hooks on this mixer (the call
        skips nn.Module.__call__), gradients wanted for its parameters, autocast, another backend. Those checks, and
        the parameters' layout, hold for a whole forward: a frozen Vim makes them once per forward for all its blocks,
        in one pass, instead of between two kernels each (a Vim-Ti at batch 1 1.08× as fast without them there,
        docs/cpu_speed.md, round 18)."""
        if self._prepared is None or calls_hooks(self):
            return None
        weight = _parameter(norm, "weight")
        if wants_grad(chain([weight], self.parameters())):
            return None
        laid_out = self._laid_out()
        if not fused_block_cpu(weight, *laid_out.in_proj, laid_out.out_proj):
            return None
        return FrozenBlock(self, weight, norm.eps, laid_out, self._inner_params(laid_out))

    def _forward(self, hidden: Tensor, workspace: Workspace | None) -> Tensor:
        """B×L×C → B×L×C by the ops of rmeeto.ops; in_proj's and dt_proj's outputs, and the cpu kernels'
        (which see the active workspace), in the workspace when one is given (nothing from it is returned).
        With a workspace on the cpu backend both directions are one mamba_inner_cpu call: the same numbers as
        _scan's ops up to dt_proj's summation order, without their per-call dispatch (a Vim-Ti mixer 1.31×
        faster at batch 1 with a call per direction, docs/cpu_speed.md, round 5). Inside frozen(), in_proj,
        x_proj and out_proj multiply by their weights packed once for MKL (rmeeto.ops.packed; the same bits), and
        on the cpu backend the whole mixer is one mixer_cpu call (the same bits again). A recording mixer takes those
        calls too, and makes its Δ record from x_proj's outputs (_record_from)."""
        laid_out = None if workspace is None else self._laid_out()
        if laid_out is not None and fused_mixer_cpu(hidden, *laid_out.in_proj, laid_out.out_proj):  # x_proj packs too
            x_dbl = self._x_dbl(hidden)
            params = self._inner_params(laid_out)
            out = mixer_cpu(hidden, laid_out.in_proj, params, laid_out.out_proj, workspace, x_dbl)
            return self._record_from(x_dbl, params, out)
        # in_proj by halves: x and z each come out contiguous B×L×Dᵢ, so the scan reads z without a copy
        if laid_out is None:
            halves = [(w, None) for w in self.in_proj.weight.chunk(2)]
        else:  # the packed halves' own weights: the same values, without chunk's two views at every call
            halves = [(packed.weight, packed) for packed in laid_out.in_proj]
        x, z = (_matmul(hidden, w, workspace, packed).transpose(1, 2) for w, packed in halves)  # B×Dᵢ×L
        if workspace is not None and fused_inner_cpu(x):  # no graph: both directions in one call
            x_dbl = self._x_dbl(hidden)
            params = self._inner_params(laid_out)
            out = self._project(mamba_inner_cpu(x, z, params, workspace, x_dbl), laid_out.out_proj)
            return self._record_from(x_dbl, params, out)
        if workspace is None and not self.record and fused_inner_cpu(x) and not torch.is_autocast_enabled("cpu"):
            # gradients (or tensors off the CPU, which fused_inner_cpu rules out): both directions as one node
            return self._project(mamba_inner_cpu_grad(x, z, self._direction(""), self._direction("_b")))
        y_f, d_f, b_f, c_f = self._scan(x, z, "", workspace)
        y_b, d_b, b_b, c_b = self._scan(x, z, "_b", workspace)
        if self.record:
            self.last_record = ScanRecord(
                delta=(
                    F.softplus(d_f.float() + self.dt_proj.bias.float()[:, None]),
                    F.softplus(d_b.float() + self.dt_proj_b.bias.float()[:, None]),
                ),
                B=(b_f, b_b),
                C=(c_f, c_b),
            )
        # in place where autograd allows (nothing recorded on y_f), as the halving always is: each new B×L×Dᵢ
        # buffer costs page faults on a CPU (glibc hands big blocks back to the OS when freed)
        return self._project(y_f + y_b if y_f.requires_grad else y_f.add_(y_b))

    def _x_dbl(self, hidden: Tensor) -> Tensor | None:
        """For a recording mixer on the cpu kernels, where they put x_proj's outputs for hidden (B×L×C): a new
        2×B×L×(R+2N) tensor (the record keeps views of it); None when not recording."""
        if not self.record:
            return None
        nb, L, _ = hidden.shape
        return hidden.new_empty(2, nb, L, self.dt_rank + 2 * self.d_state)

    def _record_from(self, x_dbl: Tensor | None, params: InnerParams, out: Tensor) -> Tensor:
        """Keep the record of a call on the cpu kernels (with ``params``) whose x_proj outputs are x_dbl (2×B×L×(R+2N):
        dt, B, C per direction, in sequence order; None: nothing to record): Δ as the scan computed it
        (delta_record); gives back ``out``."""
        if x_dbl is None:
            return out
        delta = delta_record(x_dbl, params).transpose(2, 3)  # 2×B×Dᵢ×L views of token-major memory
        _, Bm, Cm = torch.split(x_dbl.transpose(2, 3), [self.dt_rank, self.d_state, self.d_state], dim=2)
        self.last_record = ScanRecord(delta=(delta[0], delta[1]), B=(Bm[0], Bm[1]), C=(Cm[0], Cm[1]))
        return out

    def _project(self, y: Tensor, packed: PackedLinear | None = None) -> Tensor:
        """The directions' summed B×Dᵢ×L output → B×L×C: out_proj, halved with ``divide_out``; or ``packed``
        (fp32 without autocast only), out_proj's weight as a PackedLinear with the halving in it."""
        y = y.transpose(1, 2)  # no copy: token-major y on the cpu backend
        if packed is not None:
            return packed(y)
        out = self.out_proj(y)
        return out.mul_(0.5) if self.divide_out else out  # halving after the linear map is exact: fewer values


@dataclass(frozen=True)
class FrozenBlock:
    """A Vim block (add + RMSNorm with ``weight`` and ``eps``, then ``mixer``) laid out for the cpu kernels inside
    rmeeto.frozen (BiMamba.frozen_block): ``laid_out`` and ``params`` are the mixer's parameters as they read them,
    for this forward. Called as ``block(hidden, residual)``: one block_cpu call, or None where its tensors do not fit
    (cpu_block_inputs) or would record gradients. A recording mixer keeps its Δ record too (_record_from)."""

    mixer: BiMamba
    weight: Tensor
    eps: float
    laid_out: Prepared
    params: InnerParams

    def __call__(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """B×L×C hidden and residual (None before the first block) → (mixer output, summed residual), new tensors."""
        if not cpu_block_inputs(hidden, residual) or wants_grad((hidden, residual)):
            return None
        mixer, laid_out = self.mixer, self.laid_out
        x_dbl = mixer._x_dbl(hidden)
        with reuse() as workspace:
            out = block_cpu(hidden, residual, self.weight, self.eps, laid_out.in_proj, self.params, laid_out.out_proj,
                            workspace, x_dbl)  # fmt: skip
        return mixer._record_from(x_dbl, self.params, out)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``with frozen(model): ...``: for inference with weights that do not change inside. The Vim mixers of
    ``model`` then lay out their parameters for the cpu kernels once (conv taps, A = −exp(A_log), …) instead
    of at every call: a merged Vim-S 1.05× and a merged Vim-Ti 1.12–1.17× as fast at batch 1
    (docs/cpu_speed.md, round 6), in_proj's and out_proj's weights packed for MKL among them (rmeeto.ops.packed,
    round 12; packed copies of those weights are kept, for the last two row counts: round 13). A parameter given
    new data or changed by a tensor operation is seen at the next forward (its address or version counter moves)
    and laid out again; a write through ``param.data`` is not, hence the explicit scope. Forwards that record
    gradients or Δ take the usual path, unaffected.

    The scope also holds the inference workspace (rmeeto.ops.workspace.hold) on this thread: one forward's
    temporaries take the memory the previous one used instead of fresh pages (a merged Vim-S at batch 8
    page-faulted about 8,600 times a forward without, 560 with; docs/cpu_speed.md, round 9). It keeps the
    largest temporaries any forward in the scope asked for (a few B×L×Dᵢ buffers) until the scope ends."""
    mixers = [m for m in model.modules() if isinstance(m, BiMamba)]
    before = [m._prepared for m in mixers]
    for m in mixers:
        m._prepared = [] if m._prepared is None else m._prepared
    try:
        with hold():
            yield model
    finally:
        for m, prepared in zip(mixers, before, strict=True):
            m._prepared = prepared


def _derive(sources: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """BiMamba._sources → _direction's tensors: Δ bias and D in fp32, A = −exp(A_log)."""
    conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_log, d = sources
    return conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias.float(), -torch.exp(a_log.float()), d.float()


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def calls_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook of its own or a global one: what nn.Module.__call__ checks
    before it goes straight to forward. The global hooks are private names of torch.nn.modules.module: where one
    is missing (another torch), a hook is assumed."""
    for name in _HOOKS:  # a plain loop, not any() over a generator: see rmeeto.ops.common.wants_grad
        if getattr(module, name) or getattr(torch_module, "_global" + name, True):
            return True
    return False


_DIRECTIONS = {
    "": ("conv1d", "x_proj", "dt_proj", "A_log", "D"),
    "_b": ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b"),
}
"""BiMamba's module and parameter names per direction suffix."""
_MISSING = object()


def _parameter(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name)`` for a parameter, from the module's parameter dict where it is registered there (a
    dict lookup instead of nn.Module.__getattr__), else by attribute (a wrapper's or parametrization's property)."""
    found = module._parameters.get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


def param_stamp(params: tuple[Tensor | None, ...]) -> list[int]:
    """The addresses and version counters of params (None skipped): they move when a parameter gets new data
    or is changed in place by a tensor operation."""
    return [x for p in params if p is not None for x in (p.data_ptr(), p._version)]


def _matmul(a: Tensor, w: Tensor, workspace: Workspace | None, packed: PackedLinear | None = None) -> Tensor:
    """a @ wᵀ (…×K @ (N×K)ᵀ), into the workspace when one is given (fp32 only, and not under autocast, whose
    product would not be fp32), by ``packed`` (w's packed copy) when given."""
    if workspace is None or a.dtype != torch.float32 or torch.is_autocast_enabled(a.device.type):
        return a @ w.t()
    out = workspace.empty(*a.shape[:-1], w.shape[0])
    return torch.matmul(a, w.t(), out=out) if packed is None else packed(a, out)


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, floor: float) -> None:
    """Mamba's initialisation: dt = softplus(bias) log-uniform in [dt_min, dt_max]."""
    std = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
