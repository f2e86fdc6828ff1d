"""A client's model kept in the codec's wire layout: every tensor of its state dict a view into
one buffer laid out as a payload's data section (:func:`flcore.codec.flat_buffer`).

A client loads the global model into its model and sends its own weights back every round.
Tensor by tensor that is, each way, a shape check, a copy and a buffer per tensor: for a
model of small tensors (benchmark case C) the Python per tensor costs more than the bytes.
With the model in the wire layout, a payload of the same layout loads in one copy per
dtype, and the reply is its header and one copy of the buffer (bench/README.md has the
figures). The arithmetic is untouched: the tensors keep their shapes, dtypes and values and
only their memory moves, as with the flat parameters of FSDP.

A model is adopted the first time a client loads weights into it, and only if every tensor of
its state dict is a plain strided CPU tensor of a dtype the codec carries that owns its
memory alone: tied weights, views of other tensors, tensor subclasses (lazy modules' unset
parameters) and models whose state dict torch builds some other way are left as they are.
Code that kept a reference to a tensor's old memory (``w = layer.weight.data`` before the
first round) no longer sees the model's values. Every later use checks that each tensor is
still where it was put, so a tensor replaced or re-pointed later is seen, and the
tensor-by-tensor path takes over.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from flcore import codec
from flcore.state import state_dict, state_tensors

__all__ = ["FlatModel", "flat_model"]

_PLAIN = (torch.Tensor, nn.Parameter)


class FlatModel:
    """A model adopted into one buffer: :attr:`flat` and its tensors by state-dict key."""

    __slots__ = ("flat", "places", "weights")

    def __init__(self, flat: codec.Flat) -> None:
        self.flat = flat
        #: The buffer's tensors by state-dict key: what :func:`flcore.codec.encode` sends in
        #: one copy (``flat=self.flat``).
        self.weights = dict(zip(flat.layout.names, flat.tensors, strict=True))
        self.places = {n: (t.data_ptr(), t.shape, t.dtype) for n, t in self.weights.items()}

    def intact(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` (the model's state dict now) still reads every tensor from where
        it was put, as the same contiguous view (a transposed one reads other values)."""
        places = self.places
        if len(state) != len(places):
            return False
        for name, tensor in state.items():
            place = places.get(name)
            if (
                place is None
                or tensor.data_ptr() != place[0]
                or tensor.shape != place[1]
                or tensor.dtype != place[2]
                or not tensor.is_contiguous()
            ):
                return False
        return True

    def load(
        self,
        flat: codec.Flat,
        weights: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> bool:
        """Copy ``weights``, decoded with ``flat``, into the model a dtype at a time; ``False``
        (nothing copied) unless they have this model's layout and the model is intact."""
        ours = self.flat.layout
        if flat.layout is not ours and flat.layout.key != ours.key:
            return False
        if not (flat.covers(weights) and self.intact(state)):
            return False
        # The runs are plain tensors that require no grad (the model's parameters are views
        # of them): autograd records nothing here, with or without no_grad's cost.
        for mine, theirs in zip(self.flat.runs, flat.runs, strict=True):
            mine.copy_(theirs)
        return True


#: Each model seen: adopted, or ``False`` when it cannot be.
_MODELS: weakref.WeakKeyDictionary[nn.Module, FlatModel | Literal[False]] = (
    weakref.WeakKeyDictionary()
)


def flat_model(model: nn.Module) -> FlatModel | None:
    """``model`` in the wire layout, adopted on the first call; ``None`` for a model that
    cannot be. Adopting moves the model's tensors: take its state dict after this call."""
    known = _MODELS.get(model)
    if known is None:
        known = _adopt(model) or False
        _MODELS[model] = known
    return known or None


def _adopt(model: nn.Module) -> FlatModel | None:
    tensors = state_tensors(model)  # the state dict's keys, the tensors themselves
    if not tensors:
        return None
    places = set()
    for tensor in tensors.values():
        if not _owns_plain_memory(tensor) or tensor.data_ptr() in places:
            return None
        places.add(tensor.data_ptr())
    flat = codec.flat_buffer(tensors)
    before = {}
    with torch.no_grad():
        for name, view in zip(flat.layout.names, flat.tensors, strict=True):
            tensor = tensors[name]
            view.copy_(tensor)
            before[name] = tensor.data
            tensor.data = view
    adopted = FlatModel(flat)
    if adopted.intact(state_dict(model)):
        return adopted
    with torch.no_grad():  # the model reads its state from elsewhere: put it back
        for name, data in before.items():
            tensors[name].data = data
    return None


def _owns_plain_memory(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) in _PLAIN
        and tensor.layout == torch.strided
        and tensor.is_cpu
        and tensor.dtype in codec.NAMES
        and tensor.numel() > 0
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.nbytes
    )
