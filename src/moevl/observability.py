"""The names of the metrics moevl logs (TensorBoard, ``moe_stats.json``, reports, benches): one place, so a
writer and its readers cannot drift apart. Depends on nothing.

Every scalar is logged averaged over the MoE layers under its name, and per layer under ``per_layer(name, i)``.
"""

from __future__ import annotations

# --- the MoE layer (moevl.training.stats) --------------------------------------------------------------
BALANCE_LOSS = "moe/balance_loss"  # 1.0 = perfectly balanced load (MoE-LLaVA's E * sum_i f_i P_i)
Z_LOSS = "moe/z_loss"
EXPERTS_PER_TOKEN = "moe/experts_per_token"
# MaxVio (Wang et al. 2024, arXiv 2408.15664): (max_i load_i - mean load) / mean load, load_i the (token, slot)
# pairs of the batch's real tokens routed to expert i; 0 = perfectly balanced, E - 1 = every pair on one expert
MAX_VIO = "moe/maxvio"

# --- router health (moevl.training.stats, issue 11) ---------------------------------------------------
ROUTER_ENTROPY = "router/entropy_normalized"  # 1 = uniform routing
ROUTER_TOP1 = "router/top1_prob"
ROUTER_LOGIT_STD = "router/logit_std"


def router_mi(label: str, normalized: bool = False) -> str:
    """Mutual information between first-choice expert and ``label`` ("modality", "category")."""
    return f"router/mi_{label}{'_normalized' if normalized else ''}"


ROUTER_MI_MODALITY = router_mi("modality", normalized=True)

# --- LTDR ----------------------------------------------------------------------------------------------
TAIL_SHARE = "ltdr/tail_share"  # tail tokens / vision tokens

# --- STGC (the keys of ``moevl.stgc.STGCStats.summary`` under ``stgc/``) -------------------------------


def stgc(name: str) -> str:
    return f"stgc/{name}"


CONFLICT_RATIO = stgc("conflict_ratio")
COSINE_MEAN = stgc("cosine_mean")
CEL = stgc("cel")
CEL_GRAD_RATIO = stgc("cel_grad_ratio")  # the CEL's gradient on the router logits over the rest of it
NEGATIVE_SHARE = stgc("negative_share")  # the conflict ratio at tau = 0, whatever the run's tau


def per_layer(name: str, layer: int) -> str:
    """The per-layer key of a scalar (``router/entropy_normalized/L3``)."""
    return f"{name}/L{layer}"


def per_expert(name: str, layer: int, expert: int) -> str:
    return f"{per_layer(name, layer)}/e{expert}"
