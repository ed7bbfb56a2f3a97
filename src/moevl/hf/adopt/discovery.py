"""Finding the native sparse blocks of a model, by structure: a module owning an experts module of
transformers' experts interface (``moevl.hf.adopt.experts_spec.is_experts_module``)."""

from __future__ import annotations

from torch import nn

from moevl.hf.adopt.experts_spec import experts_child
from moevl.hf.block import MoEBlock
from moevl.hf.runtime import decoder_layers


def is_native_sparse_block(module: nn.Module) -> bool:
    """A transformers-style sparse block by structure: a module owning an experts module of the
    experts interface (``is_experts_module``), not one moevl built."""
    return not isinstance(module, MoEBlock) and experts_child(module) is not None


def _sparse_owner(layer: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the module in ``layer`` that owns its experts (``layer.mlp`` for most
    families; ``(layer, "")`` where the experts live in the decoder layer itself), or None (dense)."""
    if any(isinstance(m, MoEBlock) for m in layer.modules()):
        return None
    for name, module in layer.named_modules():
        if experts_child(module) is not None:
            if not name:
                return layer, ""
            parent_name, _, attr = name.rpartition(".")
            return layer.get_submodule(parent_name), attr
    return None


def sparse_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: ``decoder_layers``'s (layers with an ``mlp``), else the first layer
    list under the decoder holding experts (layers whose sparse block has another name)."""
    try:
        return decoder_layers(model)
    except ValueError:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        for _, module in (decoder if decoder is not None else model).named_modules():
            if isinstance(module, nn.ModuleList) and any(_sparse_owner(m) for m in module):
                return module
        raise


def native_layers(model: nn.Module) -> tuple[nn.ModuleList, dict[int, tuple[nn.Module, str]]]:
    """The decoder's layer list and, by layer index, the (parent, attribute) of each native sparse block."""
    layers = sparse_decoder_layers(model)
    owners = {i: _sparse_owner(layer) for i, layer in enumerate(layers)}
    return layers, {i: o for i, o in owners.items() if o is not None}


def is_native_moe(model: nn.Module) -> bool:
    """Whether ``model``'s decoder has transformers-native sparse MoE blocks moevl has not adopted
    (then ``adopt`` it; a dense model is ``upcycle``d)."""
    try:
        _, sparse = native_layers(model)
    except ValueError:
        return False
    return bool(sparse)
