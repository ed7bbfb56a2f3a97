"""Detection and distillation losses as pure functions.

Axis legend: ``N`` anchors (all images of a batch flattened), ``C`` classes, ``R`` = ``reg_max + 1``
bins of a box-side distribution.

Conventions shared by every function here: ``weight`` is an optional per-anchor ``(N,)`` weight
(0 marks ignored / padded anchors), the summed loss is divided by ``avg_factor`` (``None`` means
"divide by 1"), and loss weights (e.g. BCKD's 1.0 and 4.0) are applied by the caller.

References:
    [GFL]  X. Li et al., "Generalized Focal Loss", NeurIPS 2020.
    [BCKD] L. Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense
           Object Detection", ICCV 2023 (and its official mmdetection code).
    [LD]   Z. Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022.
    [KD]   G. Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moevl.checks import check_choice, check_float
from moevl.detection.box_ops import box_iou

__all__ = [
    "bckd_classification_loss",
    "bckd_localization_loss",
    "distribution_focal_loss",
    "giou_loss",
    "kl_distillation_loss",
    "localization_distillation_loss",
    "quality_focal_loss",
]

# BCKD uses beta = 1 for the modulating factor |p_t - p_s|^beta (RESEARCH.md §3).
_BCKD_BETA = 1.0


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(name: str, x: object, *, ndim: int, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor with {ndim} dims, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must be {tuple(ref.shape)} (the shape of {ref_name}), got shape {tuple(x.shape)}"
        )


def _check_weight(weight: Tensor | None, num: int) -> Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"weight must be a torch.Tensor of shape ({num},) or None, got {type(weight).__name__}"
        )
    if weight.shape != (num,):
        raise ValueError(f"weight must be ({num},), got shape {tuple(weight.shape)}")
    if not (weight.is_floating_point() or weight.dtype == torch.bool):
        raise ValueError(f"weight must have a floating or bool dtype, got {weight.dtype}")
    return weight


def _zero_ignored(weight: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Replace rows of ignored anchors (``weight == 0``) by zeros.

    NOTE: masking only the loss is not enough: a NaN/inf input on an ignored (padded) anchor would
    still give ``0 * nan = nan`` in the backward pass.
    """
    if weight is None:
        return tensors
    keep = weight != 0
    return tuple(torch.where(keep.view(-1, *([1] * (t.ndim - 1))), t, 0.0) for t in tensors)


def _reduce(per_anchor: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None) -> Tensor:
    """Weighted sum of ``(N,)`` per-anchor losses divided by ``avg_factor``."""
    if weight is not None:
        # NOTE: multiply by a where() rather than a 0 weight, so a non-finite loss on an ignored
        # anchor cannot leak NaN into the sum.
        per_anchor = torch.where(weight != 0, per_anchor * weight.to(per_anchor.dtype), 0.0)
    total = per_anchor.sum()
    if avg_factor is None:
        return total
    if not isinstance(avg_factor, Tensor) and avg_factor <= 0:
        raise ValueError(f"avg_factor must be a positive number or None, got {avg_factor!r}")
    return total / avg_factor


# ---------------------------------------------------------------------------------------------
# BCKD (the method)


def bckd_classification_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
) -> Tensor:
    """BCKD classification distillation ([BCKD] Eq. 4-5; RESEARCH.md §3 ``L_cls``).

    Each class is distilled as its own binary problem::

        p_t = sigmoid(z_t) (constant), p_s = sigmoid(z_s)
        l_ic = BCE(p_s_ic, p_t_ic) * |p_t_ic - p_s_ic| ** beta,  beta = 1
        L_cls = sum_i w_i sum_c l_ic / avg_factor

    No temperature. As in the official code the modulating weight ``|p_t - p_s|`` is **not**
    detached: gradient flows through it (as in Quality Focal Loss).

    Args:
        student_logits: ``(N, C)`` student classification logits.
        teacher_logits: ``(N, C)`` teacher logits (treated as constants).
        weight: ``(N,)`` per-anchor weight; 0 for ignored anchors, 1 for valid ones.
        avg_factor: divisor of the summed loss, normally the number of positive anchors.

    Returns:
        A scalar tensor.
    """
    _check_tensor("student_logits", student_logits, ndim=2)
    _check_tensor("teacher_logits", teacher_logits, ndim=2)
    _check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    weight = _check_weight(weight, student_logits.shape[0])
    student_logits, teacher_logits = _zero_ignored(weight, student_logits, teacher_logits)
    target = teacher_logits.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    modulation = (target - student_logits.sigmoid()).abs().pow(_BCKD_BETA)  # not detached
    return _reduce((bce * modulation).sum(dim=1), weight, avg_factor)


def bckd_localization_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_boxes: Tensor,
    teacher_boxes: Tensor,
    *,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    iou: str = "giou",
) -> Tensor:
    """BCKD localization distillation ([BCKD] Eq. 7-8; RESEARCH.md §3 ``L_loc``).

    ::

        w_i = max_c |sigmoid(z_t_ic) - sigmoid(z_s_ic)|          (detached)
        L_loc = sum_i weight_i * w_i * (1 - GIoU(b_s_i, b_t_i)) / avg_factor

    Teacher boxes are constants. The official code uses GIoU; the paper writes IoU — pass
    ``iou="iou"`` for that.

    Args:
        student_logits: ``(N, C)`` student classification logits (only used, detached, for ``w_i``).
        teacher_logits: ``(N, C)`` teacher classification logits.
        student_boxes: ``(N, 4)`` decoded student boxes ``(x1, y1, x2, y2)``.
        teacher_boxes: ``(N, 4)`` decoded teacher boxes.
        weight: ``(N,)`` per-anchor weight; 0 marks ignored anchors.
        avg_factor: divisor of the summed loss, normally the number of positive anchors.
        iou: ``"giou"`` (default, official code) or ``"iou"`` (paper).

    Returns:
        A scalar tensor.
    """
    _check_tensor("student_logits", student_logits, ndim=2)
    _check_tensor("teacher_logits", teacher_logits, ndim=2)
    _check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    _check_tensor("student_boxes", student_boxes, ndim=2)
    if student_boxes.shape != (student_logits.shape[0], 4):
        raise ValueError(
            f"student_boxes must be ({student_logits.shape[0]}, 4), got shape {tuple(student_boxes.shape)}"
        )
    _check_tensor("teacher_boxes", teacher_boxes, ndim=2)
    _check_same_shape("teacher_boxes", teacher_boxes, "student_boxes", student_boxes)
    check_choice("iou", iou, ("iou", "giou"))
    weight = _check_weight(weight, student_logits.shape[0])
    student_logits, teacher_logits, student_boxes, teacher_boxes = _zero_ignored(
        weight, student_logits, teacher_logits, student_boxes, teacher_boxes
    )
    with torch.no_grad():
        gap = (teacher_logits.sigmoid() - student_logits.sigmoid()).abs().max(dim=1).values  # (N,)
    overlap = box_iou(student_boxes, teacher_boxes.detach(), mode=iou, aligned=True)  # (N,)
    return _reduce(gap * (1.0 - overlap), weight, avg_factor)


# ---------------------------------------------------------------------------------------------
# baselines the paper compares against


def kl_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
) -> Tensor:
    """Softmax-KL distillation of class scores ([KD]), the baseline BCKD argues against.

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per anchor, over the ``C`` classes.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)`` (constants).
        temperature: softmax temperature ``T``.
        weight: ``(N,)`` per-anchor weight.
        avg_factor: divisor of the summed loss.
    """
    _check_tensor("student_logits", student_logits, ndim=2)
    _check_tensor("teacher_logits", teacher_logits, ndim=2)
    _check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    check_float("temperature", temperature, minimum=0.0, exclusive_minimum=True)
    weight = _check_weight(weight, student_logits.shape[0])
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return _reduce(kl * temperature**2, weight, avg_factor)


def localization_distillation_loss(
    student_distributions: Tensor,
    teacher_distributions: Tensor,
    *,
    temperature: float = 10.0,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
) -> Tensor:
    """LD: KL distillation of the per-side box distributions ([LD] Eq. 4).

    ``T^2 * KL(softmax(t / T) || softmax(s / T)) / R`` for each of the 4 sides, averaged over sides.
    NOTE: the ``/ R`` follows the official LD code (mmdetection's ``KnowledgeDistillationKLDivLoss``
    takes the mean, not the sum, over the ``R`` bins), where the paper writes a plain KL.

    Args:
        student_distributions: ``(N, 4, R)`` logits of the student's box-side distributions.
        teacher_distributions: ``(N, 4, R)`` teacher logits (constants).
        temperature: ``T`` (10 in the LD paper).
        weight: ``(N,)`` per-anchor weight.
        avg_factor: divisor of the summed loss.
    """
    _check_tensor("student_distributions", student_distributions, ndim=3)
    _check_tensor("teacher_distributions", teacher_distributions, ndim=3)
    if student_distributions.shape[1] != 4:
        raise ValueError(
            f"student_distributions must be (N, 4, R), got shape {tuple(student_distributions.shape)}"
        )
    _check_same_shape(
        "teacher_distributions", teacher_distributions, "student_distributions", student_distributions
    )
    check_float("temperature", temperature, minimum=0.0, exclusive_minimum=True)
    weight = _check_weight(weight, student_distributions.shape[0])
    log_p_t = F.log_softmax(teacher_distributions.detach() / temperature, dim=2)
    log_p_s = F.log_softmax(student_distributions / temperature, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).mean(dim=2)  # (N, 4), mean over bins as the official code
    return _reduce(kl.mean(dim=1) * temperature**2, weight, avg_factor)


# ---------------------------------------------------------------------------------------------
# detector training losses (GFL)


def quality_focal_loss(
    logits: Tensor,
    labels: Tensor,
    scores: Tensor,
    *,
    beta: float = 2.0,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Quality Focal Loss ([GFL] Eq. 5).

    The soft target is the IoU ``scores[i]`` at class ``labels[i]`` and 0 elsewhere;
    ``QFL = BCE(sigmoid(z), y) * |y - sigmoid(z)| ** beta`` summed over classes.

    Args:
        logits: ``(N, C)`` classification logits.
        labels: ``(N,)`` long; values in ``[0, C)`` are positives, ``C`` (or anything outside) background.
        scores: ``(N,)`` IoU quality targets (ignored for background).
        beta: focusing parameter (2 in GFL).
        weight: ``(N,)`` per-anchor weight.
        avg_factor: divisor, normally the number of positives.
    """
    _check_tensor("logits", logits, ndim=2)
    _check_tensor("labels", labels, ndim=1, floating=False)
    _check_tensor("scores", scores, ndim=1)
    num, num_classes = logits.shape
    weight = _check_weight(weight, num)
    pos = (labels >= 0) & (labels < num_classes)
    target = torch.zeros_like(logits)
    pos_idx = pos.nonzero(as_tuple=True)[0]
    target[pos_idx, labels[pos_idx]] = scores[pos_idx].detach().to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = bce * (target - logits.sigmoid()).abs().pow(beta)
    return _reduce(loss.sum(dim=1), weight, avg_factor)


def distribution_focal_loss(
    distributions: Tensor,
    targets: Tensor,
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Distribution Focal Loss ([GFL] Eq. 6), averaged over the 4 sides of a box.

    ``DFL(S, y) = -((y_r - y) log S_l + (y - y_l) log S_r)`` with ``y_l = floor(y)``, ``y_r = y_l + 1``.

    Args:
        distributions: ``(N, 4, R)`` logits over ``R`` integer distances.
        targets: ``(N, 4)`` float distances in ``[0, R - 1)``.
        weight: ``(N,)`` per-anchor weight.
        avg_factor: divisor.
    """
    _check_tensor("distributions", distributions, ndim=3)
    _check_tensor("targets", targets, ndim=2)
    if targets.shape != distributions.shape[:2]:
        raise ValueError(
            f"targets must be {tuple(distributions.shape[:2])}, got shape {tuple(targets.shape)}"
        )
    weight = _check_weight(weight, distributions.shape[0])
    left = targets.long().clamp(max=distributions.shape[2] - 2)
    right = left + 1
    w_left = right.to(targets.dtype) - targets
    w_right = targets - left.to(targets.dtype)
    log_probs = F.log_softmax(distributions, dim=2)
    loss = -(
        log_probs.gather(2, left[..., None])[..., 0] * w_left
        + log_probs.gather(2, right[..., None])[..., 0] * w_right
    )
    return _reduce(loss.mean(dim=1), weight, avg_factor)


def giou_loss(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """``1 - GIoU`` box regression loss (Rezatofighi et al., CVPR 2019), ``(N, 4)`` boxes."""
    _check_tensor("pred_boxes", pred_boxes, ndim=2)
    _check_tensor("target_boxes", target_boxes, ndim=2)
    _check_same_shape("target_boxes", target_boxes, "pred_boxes", pred_boxes)
    weight = _check_weight(weight, pred_boxes.shape[0])
    return _reduce(1.0 - box_iou(pred_boxes, target_boxes, mode="giou", aligned=True), weight, avg_factor)
