"""Memory reused from one Vim block to the next for the big temporaries of a CPU forward without gradients.

glibc's malloc hands large freed blocks back to the OS, so each fresh B×L×Dᵢ temporary page-faults its
memory in again: a merged Vim-S forward at batch 8 took about 166k minor faults, some 1 µs each on this
project's machine, near a fifth of its time (its token counts change every other block, so freed blocks
rarely fit the next request). Inside :func:`reuse`, the i-th buffer asked for takes the memory of the i-th
buffer of the previous ``reuse()`` under the same :func:`hold`, so the same pages serve every block.

A Vim's forward_blocks holds a workspace, and ``rmeeto.frozen`` holds one for its whole scope, so that
forwards one after another reuse the same pages too; each mixer call that records no gradients hands out
its temporaries from it (``with reuse() as workspace``), and rmeeto's cpu kernels put their outputs there
while one is active. A buffer is valid until the next ``reuse()`` under the same hold begins, or the hold ends
(which frees the memory): nothing obtained inside ``reuse()`` may be kept past its end.

:func:`kept` does the same for work that recurs outside any hold, from a workspace each thread keeps: a Vim
mixer's backward in every training step (docs/cpu_speed.md, round 17).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_LOCAL = threading.local()


class Workspace:
    """Slots of flat fp32 CPU memory, handed out in order, each grown when a request does not fit."""

    def __init__(self) -> None:
        self._slots: list[Tensor] = []
        self._views: list[Tensor | None] = []  # per slot, the view last handed out (a Vim asks for the same shapes)
        self._next = 0
        self.cache: dict = {}
        """Data laid out for the forwards under the hold that keeps this workspace, freed with it (a frozen Vim's
        stacked block parameters: rmeeto.models.frozen_forward)."""

    def restart(self) -> None:
        """Hand out from the first slot again: what was handed out before is overwritten from now on."""
        self._next = 0

    def empty(self, *shape: int) -> Tensor:
        """An uninitialised contiguous fp32 tensor of this shape in the next slot (the same tensor object as
        the slot's last one when the shape is the same)."""
        i = self._next
        self._next += 1
        if i < len(self._views) and self._views[i].shape == shape:
            return self._views[i]
        size = math.prod(shape)
        if i == len(self._slots):
            self._slots.append(torch.empty(0, dtype=torch.float32))
            self._views.append(None)
        if self._slots[i].numel() < size:
            self._slots[i] = torch.empty(size, dtype=torch.float32)  # whatever the default dtype
        self._views[i] = self._slots[i][:size].view(shape)
        return self._views[i]


def active() -> Workspace | None:
    """The workspace of the ``reuse()`` this thread is in, if any."""
    return getattr(_LOCAL, "active", None)


@contextmanager
def hold() -> Iterator[None]:
    """Keep one workspace for the ``reuse()`` calls inside (on this thread); free it at the end."""
    outer = getattr(_LOCAL, "held", None)
    _LOCAL.held = outer or Workspace()
    try:
        yield
    finally:
        _LOCAL.held = outer


def held() -> Workspace | None:
    """The workspace this thread's innermost hold keeps, if any."""
    return getattr(_LOCAL, "held", None)


class _Reuse:
    """reuse()'s and kept()'s context manager. A class, not @contextmanager: a frozen Vim enters one every block,
    and the generator's extra steps cost several µs each time there (docs/cpu_speed.md, round 15)."""

    __slots__ = ("outer", "keep")

    def __init__(self, keep: bool):
        self.keep = keep  # kept(): the thread's kept workspace; reuse(): the held one

    def __enter__(self) -> Workspace:
        self.outer = active()
        if self.keep:
            mine = _LOCAL.kept = getattr(_LOCAL, "kept", None) or Workspace()
        else:
            mine = getattr(_LOCAL, "held", None)
        workspace = mine if mine is not None and self.outer is None else Workspace()
        workspace.restart()
        _LOCAL.active = workspace
        return workspace

    def __exit__(self, *exc: object) -> None:
        _LOCAL.active = self.outer


def reuse() -> _Reuse:
    """``with reuse() as workspace:`` hand out buffers from the held workspace from its first slot (from a new
    one when nothing is held, or inside another ``reuse()``), and make it the active one until the block ends."""
    return _Reuse(keep=False)


def kept() -> _Reuse:
    """``with kept() as workspace:`` as reuse(), from a workspace this thread keeps for good: for the temporaries
    of work that recurs outside any hold, such as a Vim mixer's backward in every training step (its B×L×Dᵢ
    gradients of the scan's inputs page-faulted in at every call: docs/cpu_speed.md, round 17). It keeps the
    largest temporaries asked for until the thread ends."""
    return _Reuse(keep=True)
