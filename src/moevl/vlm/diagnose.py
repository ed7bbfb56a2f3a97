"""``moevl diagnose``: does STGC's premise hold for this model and data?

STGC (RESEARCH.md §1) assumes that some tokens' gradients inside an expert point against the expert's mean
gradient, and that those conflicts are properties of the tokens (they persist), not noise. ``diagnose``
measures both on the user's own checkpoint and data without changing the checkpoint: the model is loaded
(a dense one upcycled in memory with the recipe's ``moe:`` settings), STGC is switched on with weight 0
(measurement only), and ``steps`` training steps of the experts and routers run on a fixed probe batch
(the first ``batch_size`` records), the weights kept in memory only. Per MoE layer and over all layers:

* the histogram of token-gradient cosines of every dispatched (token, expert) pair, their mean, standard
  deviation and the share below -0.1 (clear conflicts, not rounding around 0);
* the conflict ratio (share of pairs flagged at the recipe's threshold), also over vision tokens and over
  text tokens alone (conflicts from a visual task show among the vision tokens, which are outnumbered);
* flag persistence on the probe batch against chance (``moevl.stgc.flag_persistence``);
* router health: normalised router entropy and balance loss.

The verdict rests on three numbers, with thresholds of our choosing (``PREMISE``): cosines spread (std),
clear conflicts (share below -0.1) and persistence above chance. ``verdict`` tells the cases apart (aligned
tokens or cosines near 0: nothing to act on; conflicts whose flags are no better than chance: noise; the
premise, in part or whole); ``condition_lines`` gives each condition's value, threshold and whether it is met.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moevl import observability as metrics
from moevl.checks import check
from moevl.stgc import flag_persistence
from moevl.stgc.diagnostics import cosine_histogram
from moevl.stgc.observer import STGCStats

#: What "the premise holds" means here [our choice]: cosines spread with std >= 0.15, at least 10% of the
#: dispatched pairs below -0.1, and flags persisting at least 0.1 above chance. The digit benchmark
#: (std 0.07, cosines mean 0.02) fails the first two.
PREMISE = {"cosine_std": 0.15, "clear_conflict_share": 0.10, "persistence_lift": 0.10}
CLEAR_CONFLICT = -0.1


@dataclass
class LayerDiagnosis:
    layer: int
    conflict_ratio: float
    vision_conflict_ratio: float | None  # over the pairs of vision tokens (None: no vision token)
    text_conflict_ratio: float | None
    cosine_mean: float
    cosine_std: float
    clear_conflict_share: float
    persistence: float | None
    chance: float | None
    router_entropy_normalized: float | None
    histogram_edges: list[float]
    histogram_counts: list[int]
    histogram_flagged: list[int]


def _snapshot(stats: STGCStats) -> STGCStats:
    """A detached CPU copy of one step's statistics (the layer's record is replaced at the next forward)."""
    copy = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    copy = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in copy.items()}
    return STGCStats(**copy)


def _share(flags: torch.Tensor) -> float | None:
    return float(flags.float().mean()) if flags.numel() else None


def _summary(
    name: int,
    stats: list[STGCStats],
    vision: list[torch.Tensor],
    entropy: float | None,
    persistence: tuple[float | None, float | None],
) -> LayerDiagnosis:
    """``vision``: per step, the (P,) vision flag of each pair's token."""
    cos = torch.cat([s.cosine.float() for s in stats])
    flags = torch.cat([s.conflicts for s in stats])
    is_vision = torch.cat(vision)
    hist = cosine_histogram(stats)
    return LayerDiagnosis(
        layer=name,
        conflict_ratio=_share(flags) or 0.0,
        vision_conflict_ratio=_share(flags[is_vision]),
        text_conflict_ratio=_share(flags[~is_vision]),
        cosine_mean=float(cos.mean()) if cos.numel() else 0.0,
        cosine_std=float(cos.std()) if cos.numel() > 1 else 0.0,
        clear_conflict_share=float((cos < CLEAR_CONFLICT).float().mean()) if cos.numel() else 0.0,
        persistence=persistence[0],
        chance=persistence[1],
        router_entropy_normalized=entropy,
        histogram_edges=hist.edges.tolist(),
        histogram_counts=hist.counts.tolist(),
        histogram_flagged=hist.flagged_counts.tolist(),
    )


def conditions(overall: LayerDiagnosis) -> list[tuple[str, float | None, float, bool]]:
    """The premise's conditions on the all-layer diagnosis: ``(name, value, threshold, met)`` (``PREMISE``;
    the persistence lift is None where no pair was flagged)."""
    lift = (
        None
        if overall.persistence is None or overall.chance is None
        else overall.persistence - overall.chance
    )
    values = {
        "cosine_std": overall.cosine_std,
        "clear_conflict_share": overall.clear_conflict_share,
        "persistence_lift": lift,
    }
    return [(k, v, PREMISE[k], v is not None and v >= PREMISE[k]) for k, v in values.items()]


def condition_lines(overall: LayerDiagnosis) -> list[str]:
    """One line per condition with its value, its threshold and whether it is met."""
    what = {
        "cosine_std": "cosine std",
        "clear_conflict_share": f"share of pairs below {CLEAR_CONFLICT}",
        "persistence_lift": "flag persistence above chance",
    }
    lines = []
    for name, value, threshold, met in conditions(overall):
        shown = "n/a (no pair flagged)" if value is None else f"{value:.3f}"
        if name == "persistence_lift" and value is not None:
            shown += f" ({overall.persistence:.3f} vs chance {overall.chance:.3f})"
        lines.append(f"{what[name]} {shown}, needs >= {threshold}: {'met' if met else 'not met'}")
    return lines


#: A mean token-gradient cosine at or above this, with few clear conflicts, reads as tokens aligned with their
#: experts' mean gradient [our choice].
ALIGNED_MEAN = 0.2


def verdict(overall: LayerDiagnosis) -> tuple[str, dict[str, bool]]:
    """``(sentence, {criterion: met})`` for the all-layer diagnosis (``PREMISE``): the premise holds (all
    three met), or which case it is, named by the numbers that decide it:

    * few clear conflicts: the tokens are aligned with their experts (mean cosine >= ``ALIGNED_MEAN``), or their
      cosines sit near 0; either way nothing for STGC to act on, whatever the flags' persistence;
    * clear conflicts whose flags persist no better than chance: noise;
    * clear, persistent conflicts with a narrow cosine spread: the premise holds in part.
    """
    met = {name: ok for name, _, _, ok in conditions(overall)}
    share = f"{overall.clear_conflict_share:.3f} of the pairs below {CLEAR_CONFLICT}"
    if all(met.values()):
        sentence = (
            f"STGC's premise holds: token gradients conflict clearly ({share}) and persistently (flags "
            f"{overall.persistence:.3f} vs chance {overall.chance:.3f})."
        )
    elif not met["clear_conflict_share"]:
        if overall.cosine_mean >= ALIGNED_MEAN:
            why = f"the tokens are aligned with their experts' mean gradient (mean cosine {overall.cosine_mean:.3f})"
        else:
            why = f"token-gradient cosines sit near 0 (mean {overall.cosine_mean:.3f}, std {overall.cosine_std:.3f})"
        sentence = (
            f"STGC's premise does not hold: few conflicts ({share}): {why}; nothing for STGC to act on."
        )
    elif not met["persistence_lift"]:
        persistence = (
            "no pair was flagged at the threshold"
            if overall.persistence is None
            else f"flags persist {overall.persistence:.3f} vs chance {overall.chance:.3f}"
        )
        sentence = (
            f"STGC's premise does not hold: conflicts exist ({share}) but {persistence}: "
            "flags no better than chance, so they are noise."
        )
    else:
        sentence = (
            f"STGC's premise holds in part: clear, persistent conflicts ({share}), but the cosines spread "
            f"narrowly (std {overall.cosine_std:.3f})."
        )
    return sentence, met


def diagnose(
    cfg: Any,
    *,
    model: str | os.PathLike,
    data: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    steps: int = 10,
    batch_size: int = 16,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measures the module doc's statistics and returns them as plain data (written as ``out/diagnosis.json``
    with ``out/cosines.png`` when ``out`` is given). ``cfg``: a ``moevl.vlm.config.RunConfig`` (its ``moe:``
    settings, its STGC threshold, its stage-3 learning rate and trainable parts)."""
    from tqdm.auto import tqdm

    from moevl.atomic import atomic_write_json
    from moevl.checkpoint.load import is_sparse_checkpoint
    from moevl.config import ConfigError
    from moevl.data import DataError, read_records
    from moevl.data.processing import ConversationCollator, ConversationDataset
    from moevl.hf import moe_state
    from moevl.training.stats import routing_statistics
    from moevl.vlm.config import method_settings
    from moevl.vlm.io import check_model_dir, check_writable_target, load_model
    from moevl.vlm.parts import set_trainable
    from moevl.vlm.train import prepare_moe

    check(steps >= 2, "--steps", "an integer >= 2 (persistence compares steps)", steps, error=ConfigError)
    check(batch_size >= 1, "--batch-size", "an integer >= 1", batch_size, error=ConfigError)
    model_dir = check_model_dir(model)
    if out is not None:
        out = check_writable_target(out)
    records = read_records(data, image_folder=image_folder or cfg.data.image_folder, on_bad="error").records
    if not records:
        raise DataError(f"{data}: no records")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    settings = method_settings(cfg.moe, "baseline", monitor_conflicts=True)  # STGC at weight 0: measure only
    sparse = is_sparse_checkpoint(model_dir)
    net, processor = load_model(model_dir, moe_overrides={"stgc": settings.stgc} if sparse else None)
    how = "reconfigured" if sparse else prepare_moe(net, settings)
    set_trainable(net, cfg.stage3.trainable)
    dataset = ConversationDataset(
        records[:batch_size], processor, max_length=cfg.data.max_length, progress=False
    )
    if len(dataset) == 0:
        raise DataError(f"{data}: no probe record left (all longer than data.max_length)")
    probe = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    lr = cfg.training_arguments(3)["learning_rate"]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    net.train()
    per_layer: dict[int, list[STGCStats]] = {}
    pair_vision: dict[
        int, list[torch.Tensor]
    ] = {}  # per layer and step: (P,) whether a pair's token is vision
    entropy: dict[int, list[float]] = {}
    balance: list[float] = []
    for _ in tqdm(range(steps), desc="diagnosing", unit="step", disable=not progress):
        loss = net(**probe).loss
        loss.backward()
        scalars, _ = routing_statistics(net)
        for layer, rec in sorted(moe_state(net).context.records.items()):
            if rec.stgc is not None and rec.stgc.ready:
                stats = _snapshot(rec.stgc)
                per_layer.setdefault(layer, []).append(stats)
                vision = rec.vision_mask.detach().cpu() if rec.vision_mask is not None else None
                on_vision = (
                    vision[stats.token_ids] if vision is not None else torch.zeros_like(stats.conflicts)
                )
                pair_vision.setdefault(layer, []).append(on_vision)
            value = scalars.get(metrics.per_layer(metrics.ROUTER_ENTROPY, layer))
            if value is not None:
                entropy.setdefault(layer, []).append(value)
        balance.append(scalars.get(metrics.BALANCE_LOSS, float("nan")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not per_layer:
        raise DataError("no STGC statistics were recorded: the probe batch reached no MoE layer")

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    persist = {layer: flag_persistence(s) for layer, s in per_layer.items()}
    layers = [
        _summary(
            layer,
            s,
            pair_vision[layer],
            mean(entropy.get(layer, [])),
            (persist[layer].persistence, persist[layer].chance),
        )
        for layer, s in sorted(per_layer.items())
    ]
    # all layers: persistence is per layer (a token id means a position of that layer's batch), so the
    # layers' shares are pooled, each weighted by its flags
    weights = {layer: sum(p.flagged[:-1]) for layer, p in persist.items()}
    flagged = sum(weights.values())
    pooled: tuple[float | None, float | None] = (None, None)
    if flagged:
        pooled = tuple(  # type: ignore[assignment]
            sum(getattr(p, k) * weights[layer] for layer, p in persist.items() if getattr(p, k) is not None)
            / flagged
            for k in ("persistence", "chance")
        )
    every_step = [s for stats in per_layer.values() for s in stats]
    every_vision = [v for flags in pair_vision.values() for v in flags]
    entropies = [e for values in entropy.values() for e in values]
    overall = _summary(-1, every_step, every_vision, mean(entropies), pooled)
    sentence, met = verdict(overall)
    result = {
        "model": str(model_dir),
        "data": str(data),
        "moe": how,
        "steps": steps,
        "probe_records": len(dataset),
        "stgc_threshold": settings.stgc.threshold,
        "learning_rate": lr,
        "balance_loss": mean([b for b in balance if b == b]),
        "premise": {
            "holds": all(met.values()),
            "criteria": met,
            "thresholds": PREMISE,
            "verdict": sentence,
            "conditions": condition_lines(overall),
        },
        "overall": dataclasses.asdict(overall) | {"layer": "all"},
        "layers": [dataclasses.asdict(d) for d in layers],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "diagnosis.json", result)
        plot_cosines(result, out / "cosines.png")
    return result


def plot_cosines(result: dict[str, Any], path: Path) -> None:
    """The cosine histogram of every MoE layer (flagged pairs shaded), one panel a layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moevl.atomic import atomic_write_to

    layers = result["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], layers, strict=True):
        edges = d["histogram_edges"]
        width = edges[1] - edges[0]
        total = max(sum(d["histogram_counts"]), 1)
        ax.bar(
            edges[:-1], [c / total for c in d["histogram_counts"]], width=width, align="edge", color="#9ab"
        )
        ax.bar(
            edges[:-1], [c / total for c in d["histogram_flagged"]], width=width, align="edge", color="#c44"
        )
        ax.axvline(result["stgc_threshold"], color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {d['layer']}: conflicts {d['conflict_ratio']:.2f}", fontsize=9)
        ax.set_xlabel("token-gradient cosine")
    axes[0][0].set_ylabel("share of (token, expert) pairs")
    fig.suptitle("red: flagged as conflicting", fontsize=9)
    fig.tight_layout()
    atomic_write_to(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
