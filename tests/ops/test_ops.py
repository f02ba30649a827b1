"""The torch references define the semantics; check them against brute force and by hand."""

import math

import pytest
import torch

import egp_fast
from egp_fast import ops
from egp_fast.errors import BackendError, ConfigError


def _brute_select(w, m, k):
    # rank kept entries by (|w| with NaN last, index)
    flat, mf = w.reshape(-1).tolist(), m.reshape(-1).tolist()
    keyed = sorted((math.inf if math.isnan(v) else abs(v), 1 if math.isnan(v) else 0, i)
                   for i, (v, keep) in enumerate(zip(flat, mf)) if keep)
    out = list(mf)
    for _, _, i in sorted(keyed, key=lambda t: (t[1], t[0], t[2]))[:k]:
        out[i] = False
    return torch.tensor(out).reshape(m.shape)


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_select_ties_edge_values(k):
    w = torch.tensor([[0.5, -0.0, 0.0, float("nan")], [-0.5, float("inf"), 0.5, float("-inf")],
                      [float("nan"), 0.1, -0.1, 0.5]])
    m = torch.ones_like(w, dtype=torch.bool)
    m[0, 0] = False
    (got,) = ops.select_smallest([w], [m], [min(k, 11)], backend="torch")
    assert torch.equal(got, _brute_select(w, m, min(k, 11)))


def test_select_exact_k_random_and_dtypes():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = (torch.randint(-4, 5, (7, 13), generator=g).to(dtype)) / 4  # heavy ties
        m = torch.rand(7, 13, generator=g) > 0.3
        k = int(m.sum()) // 2
        (got,) = ops.select_smallest([w], [m], [k])
        assert int(m.sum() - got.sum()) == k
        assert torch.equal(got, _brute_select(w.float(), m, k))
        assert not (got & ~m).any()  # never un-prunes


def test_global_smallest_matches_concatenation_and_is_exact():
    ws = [torch.tensor([0.5, 0.1, 0.1]), torch.tensor([[0.1, 0.05], [0.9, 0.1]]), torch.tensor([], dtype=torch.float32)]
    ms = [torch.ones(3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool), torch.ones(0, dtype=torch.bool)]
    out = ops.global_smallest(ws, ms, 3)
    # 0.05 first, then the 0.1 ties in concatenation order: layer 0 idx 1, 2
    assert out[0].tolist() == [True, False, False]
    assert out[1].tolist() == [[True, False], [True, True]]
    assert out[2].numel() == 0
    assert sum(int(m.sum()) for m in out) == 7 - 3


def test_select_bad_counts_and_shapes():
    w, m = torch.randn(4), torch.ones(4, dtype=torch.bool)
    m[0] = False
    with pytest.raises(ConfigError, match="only 3"):
        ops.select_smallest([w], [m], [4])
    with pytest.raises(ConfigError, match="negative"):
        ops.select_smallest([w], [m], [-1])
    with pytest.raises(ConfigError, match="bool"):
        ops.select_smallest([w], [m.float()], [1])
    with pytest.raises(ConfigError, match=r"\[0, 3\]"):
        ops.global_smallest([w], [m], 5)


@pytest.mark.parametrize(
    "shape,dim",
    [((2, 3, 4, 5), 1), ((2, 5, 3), -1), ((2, 3, 3, 4), -1), ((7, 1), 1), ((1, 3, 1, 1), 1), ((5,), 0)],
)
def test_sign_count_reference_layouts(shape, dim):
    z = torch.randn(*shape)
    z.view(-1)[::3] = 0.0
    c = torch.zeros(shape[dim], dtype=torch.int64)
    ops.sign_count_(z, c, dim)
    ops.sign_count_(z, c, dim)  # accumulates
    moved = z.movedim(dim, 0).reshape(shape[dim], -1)
    assert c.tolist() == [2 * int((row > 0).sum()) for row in moved]


def test_sign_count_channels_last_threshold_and_nan():
    z = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    z[0, 1, 0, 0] = float("nan")
    c = torch.zeros(4, dtype=torch.int64)
    ops.sign_count_(z, c, 1, threshold=0.5)
    assert c.tolist() == [int((z[:, i] > 0.5).sum()) for i in range(4)]
    with pytest.raises(ConfigError, match="shape"):
        ops.sign_count_(z, torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ConfigError, match="int64"):
        ops.sign_count_(z, torch.zeros(4), 1)


def test_entropy_reference_by_hand():
    out = ops.entropy(torch.tensor([2, 0, 4, 1]), torch.tensor([4, 4, 4, 4]), torch.tensor([0, 3, 3, 4]))
    assert out.p_on.tolist() == [0.5, 0.0, 1.0, 0.25]
    assert out.layer_entropy[0].item() == pytest.approx(1.0)  # only the p=0.5 channel counts
    assert out.layer_entropy_all[0].item() == pytest.approx(1 / 3)
    assert out.layer_entropy[1].item() == 0.0  # empty site
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert out.layer_entropy[2].item() == pytest.approx(h, abs=1e-15)


def test_masked_linear_reference():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    m = torch.rand(5, 4) > 0.5
    y = ops.masked_linear(x, w, m, torch.ones(5), backend="torch")
    assert torch.allclose(y, x @ (w * m).T + 1)


def test_backend_selection_errors(monkeypatch):
    assert egp_fast.available_backends()[0] == "torch"
    with pytest.raises(BackendError, match="not a backend"):
        ops.sign_count_(torch.randn(2, 2), torch.zeros(2, dtype=torch.int64), 1, backend="fortran")
    with pytest.raises(BackendError, match="cuda"):
        ops.select_smallest([torch.randn(3)], [torch.ones(3, dtype=torch.bool)], [1], backend="cuda")
    monkeypatch.setenv("EGP_FAST_BACKEND", "torch")
    assert ops.pick("select_smallest", None, torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("EGP_FAST_BACKEND", "nope")
    with pytest.raises(BackendError):
        ops.pick("select_smallest", None, torch.device("cpu"))
