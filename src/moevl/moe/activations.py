"""Expert activations with their derivative in closed form, for the experts' hand-written backward.

Named activations use ATen's fused backward kernels (``silu_backward``, ``gelu_backward``,
``threshold_backward``): one pass over the activation input, written into a given buffer, instead
of re-running the forward under autograd. A callable activation (e.g. a Hugging Face ``act_fn``
module) works too; its backward goes through autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten

# name -> (forward, (grad, x, out) -> grad · f'(x) written into out)
_NAMED: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor, Tensor], Tensor]]] = {
    "silu": (F.silu, lambda g, x, out: _aten.silu_backward.grad_input(g, x, grad_input=out)),
    "gelu": (
        F.gelu,
        lambda g, x, out: _aten.gelu_backward.grad_input(g, x, approximate="none", grad_input=out),
    ),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda g, x, out: _aten.gelu_backward.grad_input(g, x, approximate="tanh", grad_input=out),
    ),
    "relu": (F.relu, lambda g, x, out: _aten.threshold_backward.grad_input(g, x, 0, grad_input=out)),
}
_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

ACTIVATION_NAMES = sorted([*_NAMED, *_ALIASES])


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``f`` with ``backward(grad, x) = grad · f'(x)``.

    Build it with ``Activation.resolve``.
    """

    name: str
    forward: Callable[[Tensor], Tensor]
    _backward: Callable[[Tensor, Tensor, Tensor], Tensor] | None

    @staticmethod
    def resolve(activation: str | Callable[[Tensor], Tensor]) -> Activation:
        """From a name (``silu``, ``gelu``, ``gelu_pytorch_tanh``, ``relu``, ...) or a callable."""
        if callable(activation):
            return Activation(getattr(activation, "__name__", type(activation).__name__), activation, None)
        name = _ALIASES.get(activation, activation)
        if name not in _NAMED:
            raise ValueError(
                f"activation must be one of {ACTIVATION_NAMES} or a callable, got {activation!r}"
            )
        return Activation(name, *_NAMED[name])

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def backward(self, grad: Tensor, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        """``grad · f'(x)``, written into ``out`` when given (it may be ``grad`` itself); through
        autograd for a callable activation."""
        if out is None:
            out = torch.empty_like(grad)
        if self._backward is not None:
            return self._backward(grad, x, out)
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(self.forward(xx), xx, grad)
        return out.copy_(dx)
