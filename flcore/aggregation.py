"""Streaming weighted means of state dicts: one accumulator, never a copy per client."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from flcore.codec import Flat, Layout

_kernel: ModuleType | None
try:  # float32 widened, weighted and added to a float64 sum in one pass (setup.py builds it)
    from flcore import _fold as compiled

    _kernel = compiled
except ImportError:  # installed without a C compiler: torch's two passes, the same bits
    _kernel = None

#: Elements per block when folding into a float64 sum: 512 KiB of float64, so that a block
#: of the sum (and, without the kernel, its converted contribution) stays in a core's L2.
BLOCK = 1 << 16


class WeightedMean:
    """Fold state dicts in one at a time; :meth:`result` gives their weighted mean.

    Floating tensors accumulate in float64 and are cast back to their dtype once, so the
    mean is the correctly rounded result for float16, bfloat16 and float32. Integer
    buffers (BatchNorm's ``num_batches_tracked``) get the rounded mean; booleans a
    weighted majority. With ``exact=False`` float32 and float64 tensors keep a running
    mean in their own dtype instead: one fused pass per contribution and no second copy
    of the model, within a few units in the last place of the exact mean (and exact for
    one contribution or identical ones).
    """

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        #: Tensors kept as a running mean in their own dtype (``exact=False``).
        self._running: set[str] = set()
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._buffer = torch.empty(0, dtype=torch.float64)
        #: When the first state dict came with its payload's data (:class:`flcore.codec.Flat`):
        #: its layout, and one flat accumulator per dtype's run of it, which ``_sums`` views.
        #: Later state dicts of the same layout are folded a run at a time, not a tensor at a
        #: time: the same additions, in far fewer calls for a model of many small tensors.
        self._layout: Layout | None = None
        self._flats: list[tuple[torch.Tensor, bool]] = []
        self.total_weight = 0.0
        self.count = 0

    def add(
        self, weights: Mapping[str, torch.Tensor], weight: float, flat: Flat | None = None
    ) -> None:
        """Fold ``weights`` in with ``weight``; ``flat``, the :class:`flcore.codec.Flat` they
        were decoded with, lets them be folded a dtype's run at a time."""
        _check(weights, weight, self._sums or weights)
        total = self.total_weight + weight
        if flat is not None and not flat.covers(weights):
            flat = None  # the mapping no longer holds the tensors decoded
        if not self.count and flat is not None:
            self._start_flat(flat, weight)
        elif flat is not None and self._layout is not None and flat.layout.key == self._layout.key:
            for (acc, running), run in zip(self._flats, flat.runs, strict=True):
                self._fold_in(acc, run, weight, total, running)
        else:
            for name, tensor in weights.items():
                if tensor.requires_grad:
                    tensor = tensor.detach()
                if name in self._sums:
                    self._fold_in(self._sums[name], tensor, weight, total, name in self._running)
                else:
                    self._start(name, tensor, weight)
        self.total_weight = total
        self.count += 1

    def _first(self, tensor: torch.Tensor, weight: float) -> tuple[torch.Tensor, bool]:
        """An accumulator from its first tensor, and whether it keeps a running mean."""
        if not self.exact and tensor.dtype in (torch.float32, torch.float64):
            return _empty(tensor.shape, tensor.dtype).copy_(tensor), True
        return _scaled(tensor, weight), False  # its weight times it: no zeros written first

    def _start(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        self._sums[name], running = self._first(tensor, weight)
        self._dtypes[name] = tensor.dtype
        if running:
            self._running.add(name)

    def _start_flat(self, flat: Flat, weight: float) -> None:
        self._layout = flat.layout
        for run, data in zip(self._layout.runs, flat.runs, strict=True):
            acc, running = self._first(data, weight)
            self._flats.append((acc, running))
            for name, shape, stride, first in run.views:
                self._sums[name] = acc.as_strided(shape, stride, first)
                self._dtypes[name] = run.dtype
                if running:
                    self._running.add(name)

    def _fold_in(
        self, acc: torch.Tensor, tensor: torch.Tensor, weight: float, total: float, running: bool
    ) -> None:
        if running:
            acc.lerp_(tensor, weight / total)  # mean += w/W (x - mean), one fused pass
        else:
            _fold(acc, tensor, weight, self._blocks(tensor))

    def _blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A float64 buffer of one block, for folding ``tensor`` a block at a time."""
        size = min(BLOCK, tensor.numel())
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.float64)
        return self._buffer

    def result(self) -> dict[str, torch.Tensor]:
        """The mean, once: the accumulator is divided in place and released a tensor (or a
        run) at a time, so that the result never exists beside a whole second accumulator."""
        if not self.count:
            raise ValueError("weighted mean of nothing")
        out = {}
        if self._layout is not None:
            for run, (acc, running) in zip(self._layout.runs, self._flats, strict=True):
                for name, *_ in run.views:
                    del self._sums[name]
                for name, shape, stride, first in run.views:
                    view = acc.as_strided(shape, stride, first)
                    # a tensor of its own (the cast allocates it), so that keeping one
                    # tensor of the model does not keep the whole run alive
                    out[name] = view if running else _mean(view, self.total_weight, run.dtype)
                del acc
            self._flats.clear()
            self._layout = None
            return out
        for name in list(self._sums):
            if name in self._running:
                out[name] = self._sums.pop(name)
                continue
            out[name] = _mean(self._sums.pop(name), self.total_weight, self._dtypes[name])
        return out


def _check(weights: Mapping[str, torch.Tensor], weight: float, names: Iterable[str]) -> None:
    """One more ``(state_dict, weight)`` for a mean of state dicts with these ``names``."""
    if not weight > 0:
        raise ValueError(f"weights of a weighted mean must be positive, got {weight}")
    if weights.keys() != (names.keys() if isinstance(names, dict) else set(names)):
        raise ValueError("state dicts of a weighted mean must have the same names")


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a sum or a mean. numpy asks the kernel for huge pages for
    large arrays and torch does not: writing a model-sized tensor of 4 KiB pages costs about
    as long as folding a contribution into it (a page fault per 4 KiB)."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is None:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(tuple(shape), numpy_dtype))


def _kernel_for(dtype: torch.dtype) -> ModuleType | None:
    """The compiled one-pass fold when it handles ``dtype`` (float32, and it was built)."""
    return _kernel if dtype == torch.float32 else None


def _scaled(tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * tensor`` in a new float64 tensor: an accumulator's first contribution."""
    acc = _empty(tensor.shape, torch.float64)
    flat_acc, flat = acc.view(-1), tensor.detach().reshape(-1)
    kernel = _kernel_for(flat.dtype)
    if kernel is not None:
        kernel.scale(flat_acc.numpy(), flat.numpy(), weight)
        return acc
    for start in range(0, flat.numel(), BLOCK):  # converted and scaled while in cache
        flat_acc[start : start + BLOCK].copy_(flat[start : start + BLOCK]).mul_(weight)
    return acc


def _fold(acc: torch.Tensor, tensor: torch.Tensor, weight: float, buffer: torch.Tensor) -> None:
    """``acc += weight * tensor`` in float64, a cache-sized block at a time: torch's
    mixed-dtype in-place add makes a float64 copy of the whole tensor first (the model
    twice over, for every client) and runs several times slower than this. The kernel does
    it in one pass over the whole tensor."""
    kernel = _kernel_for(tensor.dtype)
    if kernel is not None and acc.is_contiguous():
        kernel.add(_flat_array(acc), _flat_array(tensor), weight)
        return
    if tensor.dtype == torch.float64 or tensor.numel() <= BLOCK:
        acc.add_(tensor, alpha=weight)  # small: its float64 temporary is too
        return
    flat_acc, flat = acc.view(-1), tensor.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        part = flat[start : start + BLOCK]
        block = buffer[: part.numel()]
        block.copy_(part)
        flat_acc[start : start + part.numel()].add_(block, alpha=weight)


def _flat_array(tensor: torch.Tensor) -> Any:
    """The tensor as a contiguous 1-D numpy array, without a torch call for a payload's run
    (1-D, contiguous, no autograd already): a fold of a small model is a few such calls."""
    if tensor.dim() == 1 and not tensor.requires_grad and tensor.is_contiguous():
        return tensor.numpy()
    return tensor.detach().reshape(-1).numpy()


def weighted_mean(
    items: Iterable[tuple[Mapping[str, torch.Tensor], float]], exact: bool = True
) -> dict[str, torch.Tensor]:
    """The weighted mean of ``(state_dict, weight)`` pairs.

    An iterator is read one pair at a time (one accumulator, never a copy per client). A
    list or tuple, whose models are all in memory already, is averaged a block of elements
    at a time across all of them: the block's float64 sum stays in cache, so each weight
    is read once and nothing model-sized is written but the result. Both add in the same
    order with the same operations, so both give the same bits.
    """
    if exact and isinstance(items, list | tuple) and len(items) > 1:
        return _mean_in_blocks(items)
    mean = WeightedMean(exact)
    for weights, weight in items:
        mean.add(weights, weight)
    return mean.result()


def _mean_in_blocks(
    items: Sequence[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    names = list(items[0][0])
    total = 0.0
    for weights, weight in items:  # the total of WeightedMean.add, added in the same order
        _check(weights, weight, names)
        total += weight
    sums = torch.empty(BLOCK, dtype=torch.float64)
    buffer = torch.empty(BLOCK, dtype=torch.float64)
    out = {}
    for name in names:
        tensors = [weights[name].detach() for weights, _ in items]
        first = tensors[0]
        if first.dtype == torch.float64 or first.numel() <= BLOCK:
            # _fold adds these whole: so does this, for the same bits
            acc = _scaled(first, items[0][1])
            for tensor, (_, weight) in zip(tensors[1:], items[1:], strict=True):
                _fold(acc, tensor, weight, buffer)
            out[name] = _mean(acc, total, first.dtype)
            continue
        flats = [t.reshape(-1) for t in tensors]
        result = _empty(first.shape, first.dtype)
        flat_out = result.view(-1)
        kernel = _kernel_for(first.dtype)
        if kernel is not None:
            _blocks_in_one_pass(kernel, flat_out, flats, [w for _, w in items], total, sums)
            out[name] = result
            continue
        for start in range(0, first.numel(), BLOCK):  # the blocks _scaled and _fold use
            stop = min(start + BLOCK, first.numel())
            block_sum, block = sums[: stop - start], buffer[: stop - start]
            block_sum.copy_(flats[0][start:stop]).mul_(items[0][1])
            for flat, (_, weight) in zip(flats[1:], items[1:], strict=True):
                block.copy_(flat[start:stop])
                block_sum.add_(block, alpha=weight)
            flat_out[start:stop] = _finish(block_sum.div_(total), first.dtype)
        out[name] = result
    return out


def _blocks_in_one_pass(
    kernel: ModuleType,
    out: torch.Tensor,
    flats: list[torch.Tensor],
    weights: list[float],
    total: float,
    sums: torch.Tensor,
) -> None:
    """:func:`_mean_in_blocks` for float32 with the kernel: each block of every model is
    read once, into a block of the sum that stays in cache, and the block's mean written."""
    arrays = [flat.numpy() for flat in flats]
    block_sum, result = sums.numpy(), out.numpy()
    size = result.shape[0]
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        part = block_sum[: stop - start]
        kernel.scale(part, arrays[0][start:stop], weights[0])
        for array, weight in zip(arrays[1:], weights[1:], strict=True):
            kernel.add(part, array[start:stop], weight)
        kernel.mean(result[start:stop], part, total)


def _mean(total_sum: torch.Tensor, total: float, dtype: torch.dtype) -> torch.Tensor:
    """A float64 sum divided by ``total``, in ``dtype``, in a tensor of its own; without the
    kernel the sum is divided in place first."""
    kernel = _kernel_for(dtype)
    if kernel is not None and total_sum.is_contiguous():
        out = _empty(total_sum.shape, dtype)
        kernel.mean(_flat_array(out), _flat_array(total_sum), total)
        return out
    return _finish(total_sum.div_(total), dtype)


def _finish(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 mean back in its tensor's dtype: rounded for integers, a majority for
    booleans."""
    if dtype.is_floating_point or dtype.is_complex:
        return mean.to(dtype)
    if dtype == torch.bool:
        return mean >= 0.5
    return mean.round_().to(dtype)


class OrderedFold:
    """Takes a round's replies in whatever order they arrive and hands them on in client order.

    Every runtime thus folds the same sum in the same order (byte-identical results). With a
    ``mean``, each accepted contribution is folded in as soon as its predecessors are settled
    and kept without its weights, so the server holds one accumulator, not one model per
    client; only replies that overtake a slower client wait.
    """

    def __init__(self, order: list[str], mean: WeightedMean | None, on_fold: Any = None) -> None:
        self.order = order
        self.mean = mean
        self.on_fold = on_fold
        self.waiting: dict[str, Any] = {}
        self.next = 0
        self.accepted: list[Any] = []

    def settle(self, client: str, contribution: Any | None) -> None:
        """``client``'s reply counted: its contribution, or ``None`` when it was refused."""
        self.waiting[client] = contribution
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            item = self.waiting.pop(self.order[self.next])
            self.next += 1
            if item is not None:
                self._fold(item)

    def finish(self) -> list[Any]:
        """Every reply is in: clients that never answered are skipped."""
        for client in self.order[self.next :]:
            self.settle(client, self.waiting.get(client))
        return self.accepted

    def _fold(self, contribution: Any) -> None:
        if self.on_fold is not None:
            self.on_fold(contribution)
        if self.mean is None:
            self.accepted.append(contribution)
        else:
            self.mean.add(
                contribution.weights, contribution.num_samples, getattr(contribution, "flat", None)
            )
            self.accepted.append(contribution.evolve_without_weights())
