"""Router health in routing_statistics, against references written out token by token."""

import math
from types import SimpleNamespace

import pytest
import torch

from moevl.hf import MoESettings, moe_state, upcycle
from moevl.hf.runtime import MoEState, RoutingContext
from moevl.moe.routing import RoutingRecord
from moevl.training import routing_statistics
from tests.fixtures.tiny import llava_batch, tiny_llava

HEALTH = ("entropy_normalized", "top1_prob", "logit_std")


def _loop_mi(pairs):
    """I(X; Y) in nats and H(Y) of a list of (x, y) samples, by counting."""
    n = len(pairs)
    joint, px, py = {}, {}, {}
    for x, y in pairs:
        joint[(x, y)] = joint.get((x, y), 0) + 1
        px[x] = px.get(x, 0) + 1
        py[y] = py.get(y, 0) + 1
    mi = sum(c / n * math.log((c / n) / (px[x] / n * py[y] / n)) for (x, y), c in joint.items())
    h_y = -sum(c / n * math.log(c / n) for c in py.values())
    return mi, h_y


def _reference(rec, categories=None):
    """The router/... scalars of one record, token by token."""
    e = rec.probs.shape[1]
    ent, top1, spread, modality, category = [], [], [], [], []
    for t in range(rec.probs.shape[0]):
        if not rec.token_mask[t]:
            continue
        p = rec.probs[t].double().tolist()
        ent.append(-sum(q * math.log(q) for q in p if q > 0) / math.log(e))
        top1.append(max(p))
        z = rec.logits[t].double().tolist()
        mean = sum(z) / e
        spread.append(math.sqrt(sum((v - mean) ** 2 for v in z) / e))
        first = int(rec.indices[t, 0])
        if first >= 0:
            if rec.vision_mask is not None:
                modality.append((first, bool(rec.vision_mask[t])))
            if categories is not None and categories[t] >= 0:
                category.append((first, int(categories[t])))
    out = {
        "router/entropy_normalized": sum(ent) / len(ent),
        "router/top1_prob": sum(top1) / len(top1),
        "router/logit_std": sum(spread) / len(spread),
    }
    for name, pairs in (("modality", modality), ("category", category)):
        if pairs:
            mi, h = _loop_mi(pairs)
            out[f"router/mi_{name}"] = mi
            out[f"router/mi_{name}_normalized"] = mi / h if h > 0 else 0.0
    return out


def _record(logits, indices, token_mask, vision_mask):
    return RoutingRecord(
        logits=logits,
        probs=torch.softmax(logits, -1),
        indices=indices,
        weights=torch.ones(indices.shape),
        token_mask=token_mask,
        vision_mask=vision_mask,
        balance_loss=torch.zeros(()),
        z_loss=torch.zeros(()),
    )


def test_router_health_of_hand_made_records():
    g = torch.Generator().manual_seed(0)
    # layer 0: vision tokens go to experts 0/1, text to 2/3 (MI = H(modality)); token 7 is padding
    # routed against the rule, so counting it would break the deterministic mapping
    first = torch.tensor([0, 1, 0, 1, 2, 3, 2, 0])
    vision = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    rec0 = _record(torch.randn(8, 4, generator=g), torch.stack([first, (first + 1) % 4], -1), valid, vision)
    # layer 1: uniform routing (equal logits), no vision mask, one token without a first choice
    idx1 = torch.tensor([[1, 2]] * 5 + [[-1, -1]])
    rec1 = _record(torch.full((6, 4), 0.3), idx1, torch.ones(6, dtype=torch.bool), None)
    model = SimpleNamespace(moe_state=MoEState(MoESettings(), RoutingContext(records={0: rec0, 2: rec1})))
    scalars, _ = routing_statistics(model)
    ref0, ref1 = _reference(rec0), _reference(rec1)
    for key, value in ref0.items():
        assert scalars[f"{key}/L0"] == pytest.approx(value, abs=1e-6), key
    assert scalars["router/mi_modality/L0"] == pytest.approx(
        -(4 / 7) * math.log(4 / 7) - (3 / 7) * math.log(3 / 7)
    )
    assert scalars["router/mi_modality_normalized/L0"] == pytest.approx(1.0)
    assert scalars["router/entropy_normalized/L2"] == pytest.approx(1.0)
    assert scalars["router/top1_prob/L2"] == pytest.approx(0.25) and scalars["router/logit_std/L2"] == 0.0
    assert "router/mi_modality/L2" not in scalars and "router/mi_category" not in scalars
    for key in HEALTH:  # the layer average
        assert scalars[f"router/{key}"] == pytest.approx((ref0[f"router/{key}"] + ref1[f"router/{key}"]) / 2)
    assert scalars["router/mi_modality"] == pytest.approx(ref0["router/mi_modality"])  # one layer has it
    # MaxVio from the (token, slot) pairs of the real tokens, counted by hand
    for layer, rec in ((0, rec0), (2, rec1)):
        load = [0] * 4
        for t in range(rec.indices.shape[0]):
            for e in rec.indices[t].tolist():
                if rec.token_mask[t] and e >= 0:
                    load[e] += 1
        mean = sum(load) / 4
        assert scalars[f"moe/maxvio/L{layer}"] == pytest.approx((max(load) - mean) / mean)
    assert scalars["moe/maxvio/L2"] == pytest.approx(1.0)  # 10 pairs on experts 1 and 2 of 4: (5 - 2.5) / 2.5


def test_upcycled_llava_reports_router_health_and_category_mutual_information():
    torch.manual_seed(0)
    model = upcycle(tiny_llava(), num_experts=4, top_k=2, layers="all")
    for block in model.modules():  # spread the routers so that the choice depends on the token
        if hasattr(block, "router"):
            torch.nn.init.normal_(block.router.weight, std=0.5)
    batch = llava_batch((1, 2))
    categories = torch.arange(batch["input_ids"].numel()).reshape(batch["input_ids"].shape) % 3
    categories[0, :2] = -1  # positions without a category
    with torch.no_grad():
        model(**batch, category_ids=categories)  # the HF model never sees the keyword
    context = moe_state(model).context
    assert torch.equal(context.category_ids, categories)
    scalars, _ = routing_statistics(model)
    cats = categories.reshape(-1).tolist()
    for layer, rec in context.records.items():
        for key, value in _reference(rec, cats).items():
            assert scalars[f"{key}/L{layer}"] == pytest.approx(value, abs=1e-6), (layer, key)
    assert scalars["router/mi_modality"] > 0.0 and scalars["router/mi_category"] > 0.0
    assert 0.0 < scalars["router/entropy_normalized"] < 1.0
    # the next forward without categories forgets them
    with torch.no_grad():
        model(**batch)
    assert context.category_ids is None
    scalars, _ = routing_statistics(model)
    assert "router/mi_category" not in scalars and "router/mi_modality" in scalars
    with pytest.raises(ValueError, match="category_ids must have the input's shape"):
        model(**batch, category_ids=categories[:, :3])
    with pytest.raises(ValueError, match=r"category_ids must be an integer \(B, T\) tensor"):
        model(**batch, category_ids=categories.float())
