"""Dynamo does not trace into a marked block (it sees one block_call node), so it cannot guard on
what is inside: a submodule swapped in after a capture (PEFT's LoRA layers, a fused projection,
a replaced Linear) would leave the graph running the block as it was traced. Every module of a
marked block is watched; a module or a parameter registered on one of them (where none was)
gives the block a new key. Dynamo guards on the key the marked forward reads, so the next call
captures again, and the new block_call's signature traces the block as it now is.
"""

from __future__ import annotations

import weakref

import torch

from .marks import _BLOCKS, _CAPTURED, _HELD_LOCK, _KEYS, _is_marked, block_signature

_OWNER: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_HOOKS: list = []


def watch(block: torch.nn.Module, root: torch.nn.Module) -> None:
    ref = weakref.ref(block)
    for mod in root.modules():
        _OWNER[mod] = ref
    if not _HOOKS:
        from torch.nn.modules.module import (register_module_module_registration_hook,
                                             register_module_parameter_registration_hook)

        _HOOKS.append(register_module_module_registration_hook(_module_registered))
        _HOOKS.append(register_module_parameter_registration_hook(_parameter_registered))


def _rekey(parent: torch.nn.Module, added: torch.nn.Module | None = None) -> None:
    ref = _OWNER.get(parent)
    block = ref() if ref is not None else None
    if block is None or not _is_marked(block):
        return
    _new_key(block)
    if added is not None:
        watch(block, added)


def _new_key(block: torch.nn.Module) -> None:
    with _HELD_LOCK:
        old = block.__dict__.get("_ditopt_block")
        key = next(_KEYS)
        block.__dict__["_ditopt_block"] = key
        _BLOCKS[key] = block
        if old is not None:
            _BLOCKS.pop(old, None)
        _CAPTURED.pop(block, None)


def recheck_blocks(model: torch.nn.Module) -> int:
    """Give a new key to each marked block of ``model`` whose :func:`block_signature` differs from
    the one it was traced with: an attribute changed in place (an attention processor set, an
    adapter's scale), which no registration hook sees. ``ditopt.reset`` and ``ditopt.generation``
    call it: such a change is picked up at the next generation begun explicitly. Returns how
    many blocks changed.

    Example:
        >>> recheck_blocks(torch.nn.Linear(2, 2))   # nothing marked, nothing to do
        0
    """
    changed = 0
    for module in model.modules():
        captured = _CAPTURED.get(module)
        if captured is not None and _is_marked(module) and block_signature(module) != captured:
            _new_key(module)
            changed += 1
    return changed


def _module_registered(parent: torch.nn.Module, name: str, module) -> None:
    # a registration while dynamo traces (Motif slices a ModuleList in its forward, which registers
    # the slice's modules on a new list) is no change to a block; dynamo would otherwise trace this
    # lookup and name the model's modules by a path through _OWNER
    if torch.compiler.is_compiling():
        return
    if parent in _OWNER:
        _rekey(parent, module if isinstance(module, torch.nn.Module) else None)


def _parameter_registered(parent: torch.nn.Module, name: str, param) -> None:
    # a parameter replaced by another is read at every call; one where there was none (a bias
    # added) changes what the block computes
    if not torch.compiler.is_compiling() and parent in _OWNER and parent._parameters.get(name) is None:
        _rekey(parent)


__all__ = ["recheck_blocks", "watch"]


_SKIPPED = ("_parameters", "_buffers", "_modules", "_ditopt_block")


def held_tensor(block: torch.nn.Module) -> str | None:
    """Where ``block`` holds a tensor that is neither a parameter nor a buffer (an attention
    processor's table, three levels down), as ``attn1.processor.w``; None if nowhere. Such a
    tensor would be traced into the block's one shared graph as a constant (dynamo cannot even
    run the block on fake tensors with it), so the block is not marked: it is captured inline.

    Example:
        >>> held_tensor(torch.nn.Linear(2, 2)) is None
        True
    """
    def find(value, where: str, depth: int) -> str | None:
        if isinstance(value, torch.Tensor):
            return where
        if depth >= 3 or isinstance(value, (torch.nn.Module, str, bytes, type)) or callable(value) \
                and not hasattr(value, "__dict__"):
            return None
        items = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple))
                 else vars(value).items() if hasattr(value, "__dict__") else ())
        return next((w for k, v in items if (w := find(v, f"{where}.{k}", depth + 1))), None)

    for path, mod in block.named_modules():
        for name, value in vars(mod).items():
            if name not in _SKIPPED and not name.startswith("_forward") and not isinstance(value, torch.nn.Module):
                found = find(value, f"{path}.{name}" if path else name, 0)
                if found:
                    return found
    return None

