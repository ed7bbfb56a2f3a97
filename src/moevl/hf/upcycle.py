"""Sparse upcycling of Hugging Face decoders (MoE-LLaVA stage 3) and the aux-loss plumbing.

``upcycle`` replaces the decoder MLPs of a Hugging Face model (Llama, Qwen2, Mistral, Phi-3,
StableLM, Gemma, Phi, and LLaVA-family wrappers around them) by ``MoEFeedForward`` layers whose
experts are exact copies of the dense MLP and whose router is fresh. MLPs are found by structure
(``gate_proj/up_proj/down_proj``, fused ``gate_up_proj/down_proj``, or ``fc1/fc2``), not by class
name.

The model then owns one ``RoutingContext``: a forward pre-hook on the model sets it from the
input ids (vision positions = image token id) and attention mask, once per forward; every MoE
layer reads it. A forward hook adds the layers' auxiliary losses to ``outputs.loss``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moevl.moe import GroupedExperts, LTDRConfig, LTDRRouter, MoEFeedForward, RoutingRecord, TopKRouter
from moevl.stgc import STGCConfig

LayerSpec = Literal["alternate", "all", "first_half", "second_half"] | Sequence[int]


@dataclass
class RoutingContext:
    """Per-forward routing inputs shared by the MoE layers of one model, and their records.

    Set by the model's forward pre-hook; read by every ``HFMoEBlock``. The masks stay until the
    next forward of the model, so that gradient checkpointing recomputes the same routing.

    Attributes:
        token_mask: (B, T) bool, real tokens of the current forward, or None (all real).
        vision_mask: (B, T) bool, image-feature positions, or None (all text).
        records: the ``RoutingRecord`` of each MoE layer in the last forward, by layer index.
        aux_scale: factor on the auxiliary losses added to ``outputs.loss`` (``MoETrainer`` sets
            ``1 / gradient_accumulation_steps`` when the task loss is normalised over the whole
            accumulated batch, so the aux terms keep their per-micro-batch weight).
    """

    image_token_id: int | None = None
    aux_scale: float = 1.0
    token_mask: Tensor | None = None
    vision_mask: Tensor | None = None
    records: dict[int, RoutingRecord] = field(default_factory=dict)

    def begin(self, input_ids: Tensor | None, attention_mask: Tensor | None, seq_len: int | None) -> None:
        """Set the masks for a new forward (input_ids (B, T); attention_mask (B, T_past + T))."""
        self.records = {}
        if input_ids is not None:
            seq_len = input_ids.shape[-1]
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and seq_len is not None:
            token_mask = attention_mask[:, -seq_len:].bool()
        vision = None
        if input_ids is not None and self.image_token_id is not None:
            vision = input_ids == self.image_token_id
            if token_mask is not None:
                vision = vision & token_mask
        self.token_mask, self.vision_mask = token_mask, vision

    def masks_for(self, batch_shape: torch.Size) -> tuple[Tensor | None, Tensor | None]:
        """The masks when they describe hidden states of this (B, T); otherwise all-real text."""
        tok, vis = self.token_mask, self.vision_mask
        tok = tok if tok is not None and tok.shape == batch_shape else None
        vis = vis if vis is not None and vis.shape == batch_shape else None
        return tok, vis


class HFMoEBlock(MoEFeedForward):
    """``MoEFeedForward`` in the place of a Hugging Face decoder MLP: (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        *,
        router: TopKRouter,
        experts: GroupedExperts,
        layer_index: int,
        context: RoutingContext,
        stgc: STGCConfig | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        super().__init__(router=router, experts=experts, stgc=stgc, stgc_scale=stgc_scale)
        self.layer_index = layer_index
        self.__dict__["context"] = context  # shared, not a submodule, not saved

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        token_mask, vision_mask = self.context.masks_for(hidden_states.shape[:-1])
        out, record = super().forward(hidden_states, token_mask=token_mask, vision_mask=vision_mask)
        # NOTE: setdefault, so that a gradient-checkpointing recompute (during backward) does not
        # replace the record whose STGC statistics that backward fills.
        self.context.records.setdefault(self.layer_index, record)
        return out


@dataclass(frozen=True)
class UpcycleSettings:
    """What ``upcycle`` was called with; stored in ``config.moevl`` so a checkpoint reloads."""

    num_experts: int
    top_k: int
    layers: list[int]
    router: str = "topk"
    ltdr: LTDRConfig | None = None
    stgc: STGCConfig | None = None
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    balance_from: str = "top1"
    capacity_factor: float | None = None
    jitter: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpcycleSettings:
        d = dict(d)
        d["ltdr"] = None if d.get("ltdr") is None else LTDRConfig(**d["ltdr"])
        d["stgc"] = None if d.get("stgc") is None else STGCConfig(**d["stgc"])
        return cls(**d)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (of a CausalLM or a LLaVA-family wrapper), found by structure."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder = decoder if decoder is not None else model
    for _, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"upcycle: found no decoder layer list in {type(model).__name__} (looked for an nn.ModuleList "
        "whose layers all have an `mlp` attribute, under model.get_decoder())"
    )


def _select_layers(spec: LayerSpec, n: int) -> list[int]:
    if isinstance(spec, str):
        table = {
            "alternate": list(range(0, n, 2)),  # MoE-LLaVA's moe_mode="sparse"
            "all": list(range(n)),
            "first_half": list(range(n // 2)),
            "second_half": list(range(n // 2, n)),
        }
        if spec not in table:
            raise ValueError(f"layers must be one of {sorted(table)} or a list of indices, got {spec!r}")
        return table[spec]
    idx = sorted({int(i) for i in spec})
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"layers must be indices in [0, {n}), got {list(spec)}")
    return idx


def _linear(mlp: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(mlp, name, None)
    return m if isinstance(m, nn.Linear) else None


def _activation(mlp: nn.Module) -> Any:
    for name in ("act_fn", "activation_fn", "act"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError(f"upcycle: MLP {type(mlp).__name__} has no act_fn / activation_fn attribute")


def experts_from_mlp(mlp: nn.Module, num_experts: int, implementation: str = "auto") -> GroupedExperts:
    """``num_experts`` exact copies of a dense HF MLP as ``GroupedExperts``."""
    gate, up, down = _linear(mlp, "gate_proj"), _linear(mlp, "up_proj"), _linear(mlp, "down_proj")
    gate_up = _linear(mlp, "gate_up_proj")
    fc1, fc2 = _linear(mlp, "fc1"), _linear(mlp, "fc2")
    if gate is not None and up is not None and down is not None:
        gated, weights = True, {"gate_proj": gate, "up_proj": up, "down_proj": down}
        hidden, inter = gate.in_features, gate.out_features
    elif gate_up is not None and down is not None:  # Phi-3: gate and up fused, gate first
        gated, hidden, inter = True, gate_up.in_features, gate_up.out_features // 2
        weights = {"gate_up_proj": gate_up, "down_proj": down}
    elif fc1 is not None and fc2 is not None:
        gated, weights = False, {"fc1": fc1, "fc2": fc2}
        hidden, inter = fc1.in_features, fc1.out_features
    else:
        children = ", ".join(n for n, _ in mlp.named_children())
        raise ValueError(
            f"upcycle: unsupported MLP {type(mlp).__name__} (children: {children}); expected linear layers "
            "gate_proj/up_proj/down_proj, gate_up_proj/down_proj or fc1/fc2"
        )
    has_bias = any(lin.bias is not None for lin in weights.values())
    ref = next(iter(weights.values())).weight
    experts = GroupedExperts(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        gated=gated,
        activation=_activation(mlp),
        bias=has_bias,
        implementation=implementation,  # type: ignore[arg-type]
    ).to(device=ref.device, dtype=ref.dtype)

    def copy(name: str, w: Tensor, b: Tensor | None) -> None:
        getattr(experts, name).data.copy_(w.detach().unsqueeze(0).expand(num_experts, *w.shape))
        bias = getattr(experts, f"{name}_bias")
        if bias is not None:
            bias.data.copy_(
                (b.detach() if b is not None else torch.zeros(w.shape[0])).expand(num_experts, -1)
            )

    def cat_bias(*lins: nn.Linear) -> Tensor | None:
        if all(lin.bias is None for lin in lins):
            return None
        return torch.cat(
            [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins]
        )

    # Native layout: gate_up_proj (E, 2H, D) holds the gate rows then the up rows; fc1/fc2 are up/down.
    with torch.no_grad():
        if "gate_proj" in weights:
            copy("gate_up_proj", torch.cat([gate.weight, up.weight]), cat_bias(gate, up))
            copy("down_proj", down.weight, down.bias)
        elif "fc1" in weights:
            copy("up_proj", fc1.weight, fc1.bias)
            copy("down_proj", fc2.weight, fc2.bias)
        else:
            for name, lin in weights.items():
                copy(name, lin.weight, lin.bias)
    return experts


def upcycle(
    model: nn.Module,
    *,
    num_experts: int,
    top_k: int,
    layers: LayerSpec = "alternate",
    router: Literal["topk", "ltdr"] = "topk",
    ltdr: LTDRConfig | None = None,
    stgc: STGCConfig | None = None,
    balance_coef: float = 0.01,
    z_loss_coef: float = 0.0,
    balance_from: Literal["top1", "topk"] = "top1",
    capacity_factor: float | None = None,
    jitter: float = 0.0,
    freeze_dense: bool = False,
    implementation: str = "auto",
) -> nn.Module:
    """Turn a dense HF decoder (or LLaVA-family model) into a sparse MoE one, in place.

    Sparse upcycling (Komatsuzaki et al. 2023; MoE-LLaVA stage 3): each chosen decoder MLP becomes
    ``num_experts`` exact copies of itself with a fresh router, so at initialisation the model
    computes exactly what the dense one did (renormalised top-k weights sum to 1).

    Args:
        model: a ``PreTrainedModel`` (CausalLM, or a LLaVA-family model whose language model is one).
        num_experts: E (MoE-LLaVA: 4).
        top_k: experts per token (MoE-LLaVA: 2).
        layers: ``alternate`` (every other layer from 0, MoE-LLaVA's ``sparse``), ``all``,
            ``first_half``, ``second_half`` or a list of layer indices.
        router: ``topk`` or ``ltdr`` (LTDR, options in ``ltdr``).
        ltdr: LTDR options (``tail_top_k`` a, MsDaR and VsDEA switches); default ``LTDRConfig()``.
        stgc: STGC options, or None for no STGC. Its loss is averaged over the MoE layers.
        balance_coef: α, weight of the balancing loss summed over MoE layers (MoE-LLaVA: 0.01).
        z_loss_coef: weight of the router z-loss summed over MoE layers.
        balance_from: ``top1`` (DeepSpeed/MoE-LLaVA) or ``topk`` (Mixtral) expert fractions.
        capacity_factor: None (dropless, default) or a capacity factor (MoE-LLaVA used 1.5).
        jitter: Switch-style multiplicative router input noise in training.
        freeze_dense: train only experts and routers (MoE-LLaVA stage 3).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``).
    Returns:
        The same model object, upcycled, with ``model.moe_context`` (``RoutingContext``).
    """
    if getattr(model, "moe_context", None) is not None:
        raise ValueError("upcycle: this model is already upcycled")
    if router not in ("topk", "ltdr"):
        raise ValueError(f"router must be 'topk' or 'ltdr', got {router!r}")
    if ltdr is not None and router != "ltdr":
        raise ValueError(f"ltdr options were given but router is {router!r}; pass router='ltdr'")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    layer_list = decoder_layers(model)
    chosen = _select_layers(layers, len(layer_list))
    ltdr_cfg = (ltdr or LTDRConfig()) if router == "ltdr" else None
    settings = UpcycleSettings(
        num_experts=num_experts,
        top_k=top_k,
        layers=chosen,
        router=router,
        ltdr=ltdr_cfg,
        stgc=stgc,
        balance_coef=balance_coef,
        z_loss_coef=z_loss_coef,
        balance_from=balance_from,
        capacity_factor=capacity_factor,
        jitter=jitter,
    )
    config = getattr(model, "config", None)
    image_token_id = None
    if config is not None:
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
    context = RoutingContext(image_token_id=image_token_id)

    for i in chosen:
        dense = layer_list[i].mlp
        experts = experts_from_mlp(dense, num_experts, implementation)
        common = dict(
            hidden_size=experts.hidden_size,
            num_experts=num_experts,
            top_k=top_k,
            balance_from=balance_from,
            capacity_factor=capacity_factor,
            jitter=jitter,
        )
        if ltdr_cfg is not None:
            r: TopKRouter = LTDRRouter(
                **common,
                tail_top_k=ltdr_cfg.tail_top_k,
                language_only_balance=ltdr_cfg.language_only_balance,
                vision_tail=ltdr_cfg.vision_tail,
            )
        else:
            r = TopKRouter(**common)
        r.to(next(experts.parameters()).device)
        layer_list[i].mlp = HFMoEBlock(
            router=r, experts=experts, layer_index=i, context=context, stgc=stgc, stgc_scale=1.0 / len(chosen)
        )

    if freeze_dense:
        for name, p in model.named_parameters():
            p.requires_grad_(".router." in f".{name}" or ".experts." in f".{name}")

    model.__dict__["moe_context"] = context
    model.__dict__["moe_settings"] = settings
    if config is not None:
        config.moevl = settings.to_dict()
    model.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    model.register_forward_hook(_add_aux_loss)
    return model


def _begin_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    seq_len = embeds.shape[1] if embeds is not None else None
    if not isinstance(input_ids, Tensor):
        input_ids = None
    module.moe_context.begin(input_ids, kwargs.get("attention_mask"), seq_len)


def aux_loss(model: nn.Module) -> Tensor | None:
    """Sum over the MoE layers of the last forward: ``α·L_balance + z·L_z`` plus the STGC anchors."""
    context: RoutingContext = model.moe_context
    settings: UpcycleSettings = model.moe_settings
    total = None
    for record in context.records.values():
        term = record.aux_loss(settings.balance_coef, settings.z_loss_coef)
        total = term if total is None else total + term
    return None if total is None else total * context.aux_scale


def _add_aux_loss(module: nn.Module, args: tuple, output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if loss is not None:
        extra = aux_loss(module)
        if extra is not None:
            output.loss = loss + extra.to(loss.dtype)
    return output


def moe_blocks(model: nn.Module) -> list[HFMoEBlock]:
    """The upcycled MoE layers of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, HFMoEBlock)]
