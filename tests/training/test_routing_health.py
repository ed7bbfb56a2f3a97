"""Router health math against explicit loops, and the uniform-routing monitor."""

import math

import pytest
import torch

from moevl.training.routing_health import (
    UniformRoutingMonitor,
    contingency_table,
    entropy,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
)


def _loop_entropy(row):
    return -sum(p * math.log(p) for p in row if p > 0)


def _loop_mi(counts):
    """I(A;B) from a table of counts with explicit double loops over the joint probabilities."""
    total = sum(sum(r) for r in counts)
    p = [[c / total for c in r] for r in counts]
    pa = [sum(r) for r in p]
    pb = [sum(p[a][b] for a in range(len(p))) for b in range(len(p[0]))]
    mi = 0.0
    for a in range(len(p)):
        for b in range(len(p[0])):
            if p[a][b] > 0:
                mi += p[a][b] * math.log(p[a][b] / (pa[a] * pb[b]))
    return mi


def test_entropy_equals_the_loop_with_zero_log_zero():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(7, 5, generator=g) * 3, -1)
    probs[2] = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    probs[4] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    ours = entropy(probs)
    for t in range(7):
        assert float(ours[t]) == pytest.approx(_loop_entropy(probs[t].double().tolist()), abs=1e-12)
    assert float(ours[2]) == pytest.approx(math.log(2)) and float(ours[4]) == 0.0
    norm = normalized_entropy(probs)
    torch.testing.assert_close(norm, ours / math.log(5))
    assert float(normalized_entropy(torch.full((1, 6), 1 / 6))[0]) == pytest.approx(1.0)
    assert float(normalized_entropy(torch.ones(3, 1))[0]) == 0.0  # one expert: no choice
    with pytest.raises(ValueError, match=r"probs must be \(N, E\)"):
        entropy(torch.ones(4))


@pytest.mark.parametrize("shape", [(5, 3), (2, 2), (4, 7), (1, 3)])
def test_mutual_information_equals_the_double_loop(shape):
    g = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    counts = torch.randint(0, 6, shape, generator=g).double()
    counts[0, 0] = 3.0  # not empty
    ours = mutual_information(counts)
    assert float(ours) == pytest.approx(_loop_mi(counts.tolist()), abs=1e-12)
    # probabilities instead of counts: the same
    assert float(mutual_information(counts / counts.sum())) == pytest.approx(float(ours), abs=1e-12)


def test_mutual_information_of_independent_and_deterministic_tables():
    pa = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    pb = torch.tensor([0.25, 0.75], dtype=torch.float64)
    independent = pa[:, None] * pb[None, :] * 1000
    assert float(mutual_information(independent)) == pytest.approx(0.0, abs=1e-12)
    assert float(normalized_mutual_information(independent)) == pytest.approx(0.0, abs=1e-12)
    # B a function of A (experts 0, 2 -> text; 1, 3 -> vision): I = H(B), normalised 1
    det = torch.tensor([[30.0, 0.0], [0.0, 10.0], [5.0, 0.0], [0.0, 15.0]])
    h_b = _loop_entropy([35 / 60, 25 / 60])
    assert float(mutual_information(det)) == pytest.approx(h_b, abs=1e-12)
    assert float(normalized_mutual_information(det)) == pytest.approx(1.0, abs=1e-12)
    # a bijection: I = H(A) = H(B)
    assert float(mutual_information(torch.diag(torch.tensor([1.0, 2.0, 3.0])))) == pytest.approx(
        _loop_entropy([1 / 6, 2 / 6, 3 / 6]), abs=1e-12
    )
    # one column (H(B) = 0) and the empty table
    assert float(normalized_mutual_information(torch.tensor([[3.0], [4.0]]))) == 0.0
    assert float(mutual_information(torch.zeros(3, 2))) == 0.0


def test_mutual_information_refuses_bad_tables():
    for bad in (torch.tensor([[1.0, -1.0]]), torch.tensor([[math.nan, 1.0]]), torch.tensor([[math.inf]])):
        with pytest.raises(ValueError, match="finite non-negative"):
            mutual_information(bad)
    with pytest.raises(ValueError, match=r"joint must be an \(A, B\) table"):
        mutual_information(torch.ones(3))


def test_contingency_table_counts_the_pairs():
    a = torch.tensor([0, 2, 2, 1, 0, 2])
    b = torch.tensor([1, 0, 0, 1, 1, 2])
    table = contingency_table(a, b, num_a=4, num_b=3)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        expected[i, j] += 1
    assert torch.equal(table, expected)
    with pytest.raises(ValueError, match=r"b must be labels in \[0, 2\), got values in \[0, 2\]"):
        contingency_table(a, b, num_a=4, num_b=2)
    with pytest.raises(ValueError, match="a must hold integer labels"):
        contingency_table(a.float(), b, num_a=4, num_b=3)
    with pytest.raises(ValueError, match="same length"):
        contingency_table(a[:3], b, num_a=4, num_b=3)


def test_monitor_warns_once_per_layer_after_patience_flat_updates():
    monitor = UniformRoutingMonitor(tolerance=0.02, patience=3)
    flat, healthy = 0.98, 0.9799  # the boundary counts as flat
    seen = []
    for step in range(8):
        stats = {
            "router/entropy_normalized": 0.5,  # the layer average is not a layer
            "router/entropy_normalized/L0": flat,
            "router/entropy_normalized/L2": healthy if step == 1 else 1.0,  # one dip resets
            "router/entropy_normalized/L4": healthy,
            "router/top1_prob/L0": 1.0,
        }
        seen.append(monitor.update(stats))
    assert [len(w) for w in seen] == [0, 0, 1, 0, 1, 0, 0, 0]
    assert seen[2][0].startswith("MoE layer 0:") and "3 consecutive updates" in seen[2][0]
    assert seen[4][0].startswith("MoE layer 2:")  # steps 2, 3, 4 after the dip at 1
    assert monitor.warned == {0, 2}
    assert monitor.update({}) == []  # a dense model's empty statistics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tolerance": math.nan}, "tolerance must be a finite number >= 0.0 and < 1.0, got nan"),
        ({"tolerance": 1.0}, "tolerance must be a finite number >= 0.0 and < 1.0, got 1.0"),
        ({"patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"patience": True}, "patience must be an integer >= 1, got True"),
    ],
)
def test_monitor_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        UniformRoutingMonitor(**kwargs)
