"""``state_dict(model)``: what ``model.state_dict()`` returns, without walking the module tree
on every call.

torch builds a state dict by recursing through every submodule in Python, checking hooks
and recording metadata on the way. A client takes its model's state dict twice per round
(to load the global model into, and to send its own), and between training steps each
walk cost 16 us for benchmark case C's three-layer MLP in isolation (about 40 us between
training steps). Here the walk is done once per model, and a call costs 7 us: 16 ms less
CPU per case C run, about 3 % of it (bench/README.md). Later calls check that nothing the
walk found has changed (each module's class, its counts of parameters, buffers and
children, its non-persistent buffers and state-dict hooks, which child sits under each
name, which tensors are ``None``) and read every tensor from its module then, so a
parameter replaced by assignment or by ``p.data = ...`` is seen. A model the shortcut
cannot vouch for (a module with its own ``state_dict``, ``_save_to_state_dict`` or
``get_extra_state``, or with state-dict hooks) is left to torch, as is any call after a
change: that walks again.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["state_dict", "state_tensors"]

_Module = nn.Module
_OWN = ("state_dict", "_save_to_state_dict", "get_extra_state")


class _Walk:
    """Where a model's state lives, as torch's walk found it."""

    __slots__ = ("entries", "links", "modules", "nones")

    def __init__(self, model: nn.Module) -> None:
        #: (module, its class, (#parameters, #buffers, #children), its non-persistent names)
        self.modules: list[tuple[nn.Module, type, tuple[int, int, int], frozenset[str]]] = []
        #: (a module's ``_modules``, a name, the child under it)
        self.links: list[tuple[dict[str, Any], str, nn.Module]] = []
        #: (key, the owning ``_parameters`` or ``_buffers``, name), in torch's order
        self.entries: list[tuple[str, dict[str, Any], str]] = []
        #: (``_parameters`` or ``_buffers``, name) of a tensor that is ``None`` (not in the dict)
        self.nones: list[tuple[dict[str, Any], str]] = []
        self._walk(model, "")

    def _walk(self, module: nn.Module, prefix: str) -> None:
        """The order and the skips of ``Module.state_dict`` and ``_save_to_state_dict``."""
        skip = module._non_persistent_buffers_set
        counts = (len(module._parameters), len(module._buffers), len(module._modules))
        self.modules.append((module, type(module), counts, frozenset(skip)))
        for owner, persistent in ((module._parameters, None), (module._buffers, skip)):
            for name, tensor in owner.items():
                if tensor is None:
                    self.nones.append((owner, name))
                elif persistent is None or name not in persistent:
                    self.entries.append((prefix + name, owner, name))
        for name, child in module._modules.items():
            if child is not None:
                self.links.append((module._modules, name, child))
                self._walk(child, f"{prefix}{name}.")

    def plain(self) -> bool:
        """Whether every module builds its state dict as ``nn.Module`` does, from plain dicts
        (a scripted module's are wrappers of C++ state). Hooks are :meth:`read`'s to refuse:
        they may come and go after the walk."""
        for module, cls, _, _ in self.modules:
            if not all(type(d) is dict for d in (module._parameters, module._buffers)):
                return False
            if type(module._modules) is not dict:
                return False
            for attr in _OWN:
                if getattr(cls, attr) is not getattr(_Module, attr) or attr in module.__dict__:
                    return False
        return True

    def read(self, keep_vars: bool = False) -> dict[str, torch.Tensor] | None:
        """The state dict, or ``None`` when the model changed since the walk."""
        for module, cls, counts, skip in self.modules:
            if (
                type(module) is not cls
                or len(module._parameters) != counts[0]
                or len(module._buffers) != counts[1]
                or len(module._modules) != counts[2]
                or module._state_dict_hooks
                or module._state_dict_pre_hooks
                or module._non_persistent_buffers_set != skip
            ):
                return None
        for children, name, child in self.links:
            if children.get(name) is not child:
                return None
        for owner, name in self.nones:
            if owner.get(name) is not None:
                return None
        out = {}
        for key, owner, name in self.entries:
            tensor = owner.get(name)
            if tensor is None:
                return None
            out[key] = tensor if keep_vars else tensor.detach()
        return out


#: The walk of each model seen; ``False`` for a model left to torch.
_WALKS: weakref.WeakKeyDictionary[nn.Module, _Walk | Literal[False]] = weakref.WeakKeyDictionary()


def state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=keep_vars)``: the same keys in the same order, the same
    tensors (detached unless ``keep_vars``), in a plain dict (torch's ``_metadata`` of module
    versions, which only ``load_state_dict`` of an old checkpoint reads, is not attached)."""
    known = _WALKS.get(model)  # one lookup: this is on every client's path, twice a round
    if known is False:
        return model.state_dict(keep_vars=keep_vars)
    if known is not None:
        out = known.read(keep_vars)
        if out is not None:
            return out
    reference = model.state_dict()
    _WALKS[model] = _walk(model, reference)
    return model.state_dict(keep_vars=True) if keep_vars else reference


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The tensors themselves (parameters and buffers, not detached) under the keys of
    ``state_dict(model)``: what a caller may re-point with ``.data``. ``None`` for a model
    left to torch, whose state may live elsewhere."""
    tensors = state_dict(model, keep_vars=True)  # walks it, or walks it again if it changed
    return tensors if _WALKS.get(model) else None


def _walk(model: nn.Module, reference: dict[str, Any]) -> _Walk | Literal[False]:
    """A walk of ``model`` that reads what torch does, or ``False`` to leave it to torch."""
    try:
        walk = _Walk(model)
    except (AttributeError, TypeError):  # a module that keeps its state some other way
        return False
    return walk if walk.plain() and _agrees(walk.read(), reference) else False


def _agrees(ours: dict[str, torch.Tensor] | None, reference: dict[str, Any]) -> bool:
    """Whether the walk reads what torch does: a model that differs in any way is left to torch."""
    if ours is None or list(ours) != list(reference):
        return False
    return all(
        isinstance(theirs, torch.Tensor)
        and ours[key].data_ptr() == theirs.data_ptr()
        and ours[key].shape == theirs.shape
        and ours[key].dtype == theirs.dtype
        for key, theirs in reference.items()
    )
