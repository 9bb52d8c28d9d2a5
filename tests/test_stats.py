"""Tests of sinkscope.stats and sinkscope.fmt against independent numpy implementations."""

import math

import numpy as np
import pytest
import torch

from sinkscope import fmt, stats


# --------------------------------------------------------------------------- numpy references

def np_unit(X):
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def np_spread(X):
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] < 2:
        return 0.0
    u = np_unit(X)
    ubar = u.mean(0)
    return math.sqrt(((u - ubar) ** 2).sum(1).mean() / X.shape[1])


def random_batches(X, rng):
    cuts = np.sort(rng.choice(np.arange(1, X.shape[0]), size=4, replace=False))
    return np.split(X, cuts)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- norms, spread

def test_unit_and_zero_rows():
    X = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    u = stats.unit(X)
    assert u.dtype == torch.float32
    assert torch.allclose(u, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_mean_norm_and_spread_match_numpy(rng):
    X = rng.normal(size=(37, 16)) * rng.uniform(0.1, 5.0, size=(37, 1))
    Xt = torch.tensor(X, dtype=torch.float32)
    X32 = Xt.double().numpy()
    assert stats.mean_norm(Xt) == pytest.approx(np.linalg.norm(X32, axis=1).mean(), rel=1e-9)
    assert stats.spread(Xt) == pytest.approx(np_spread(X32), rel=1e-9)
    assert math.isnan(stats.mean_norm(torch.zeros(0, 4)))


def test_spread_limits(rng):
    d = torch.tensor(rng.normal(size=64), dtype=torch.float32)
    same_dir = d[None, :] * torch.tensor(rng.uniform(0.5, 3.0, size=(50, 1)), dtype=torch.float32)
    assert stats.spread(same_dir) < 1e-5
    D = 64
    many = torch.tensor(rng.normal(size=(4000, D)), dtype=torch.float32)
    # ||ubar||^2 ~ 1/N for random directions, so spread ~ sqrt((1 - 1/N)/D)
    assert stats.spread(many) == pytest.approx(math.sqrt(1.0 / D), rel=1e-3)
    assert stats.spread(torch.eye(D)) == pytest.approx(math.sqrt((1 - 1 / D) / D), rel=1e-9)
    assert math.isnan(stats.spread(torch.ones(1, D)))   # undefined below 2 vectors (reference: 0.0)
    assert math.isnan(stats.spread(torch.zeros(0, D)))


def test_norm_spread_streaming_equals_one_shot(rng):
    X = rng.normal(size=(103, 24)) + 0.7
    acc = stats.NormSpread(24)
    assert math.isnan(acc.norm()) and math.isnan(acc.spread())
    for part in random_batches(X, rng):
        acc.update(torch.tensor(part, dtype=torch.float32))
    acc.update(torch.zeros(0, 24))
    Xt = torch.tensor(X, dtype=torch.float32)
    assert acc.n == 103
    assert acc.norm() == pytest.approx(stats.mean_norm(Xt), rel=1e-6)
    assert acc.spread() == pytest.approx(stats.spread(Xt), rel=1e-6)
    assert acc.spread() == pytest.approx(np_spread(Xt.double().numpy()), rel=1e-6)
    one = stats.NormSpread(24)
    one.update(Xt[:1])
    assert math.isnan(one.spread()) and one.norm() == pytest.approx(float(Xt[0].norm()), rel=1e-6)
    with pytest.raises(AssertionError):
        acc.update(torch.zeros(3, 5))


def test_mean_var_streaming_equals_one_shot(rng):
    X = rng.normal(loc=3.0, scale=2.0, size=(91, 4, 3))
    acc = stats.MeanVar((4, 3))
    for part in random_batches(X, rng):
        acc.update(torch.tensor(part))
    X32 = torch.tensor(X, dtype=torch.float32).double().numpy()
    assert acc.n == 91
    np.testing.assert_allclose(acc.mean().numpy(), X32.mean(0), rtol=1e-10)
    np.testing.assert_allclose(acc.var().numpy(), X32.var(0), rtol=1e-9)
    scalar = stats.MeanVar()
    scalar.update(torch.tensor([1.0, 2.0]))
    scalar.update(torch.tensor([3.0, 4.0, 10.0]))
    assert float(scalar.mean()) == pytest.approx(4.0)
    assert float(scalar.var()) == pytest.approx(np.var([1, 2, 3, 4, 10]))
    with pytest.raises(AssertionError):
        acc.update(torch.zeros(2, 3, 4))


def test_head_reduce():
    m, v = stats.head_reduce(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert m == pytest.approx(3.0)
    assert v == pytest.approx(np.var([1, 2, 3, 6]))


# --------------------------------------------------------------------------- energy

def test_energy_fractions():
    Z = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0]])
    p = stats.energy_fractions(Z)
    expected = np.array([[9 / 25, 16 / 25, 0], [0, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-6)


def test_top_energy_dims_dominant(rng):
    N, F = 20, 10
    Z = rng.normal(scale=0.1, size=(N, F))
    Z[:, 7] = 10.0
    Z[:, 2] = -8.0
    Z[:, 5] = 6.0
    te = stats.top_energy_dims(torch.tensor(Z, dtype=torch.float32), k=3, tau=0.55)
    assert te.candidates == [7, 2, 5]
    assert te.dims == [7, 2, 5]
    p = Z ** 2 / (Z ** 2).sum(1, keepdims=True)
    assert te.median_mass == pytest.approx(np.median(p[:, [7, 2, 5]].sum(1)), rel=1e-6)
    np.testing.assert_allclose(te.mean_frac.numpy(), p.mean(0), rtol=1e-5)


def test_top_energy_dims_below_tau_and_even_median():
    # 4 rows; candidate mass per row: 0.5, 0.5, 0.6, 0.6 -> numpy median 0.55 (average of middles)
    Z = np.zeros((4, 4))
    for n, mass in enumerate([0.5, 0.5, 0.6, 0.6]):
        Z[n] = np.sqrt([mass, 0, (1 - mass) / 2, (1 - mass) / 2])
    te = stats.top_energy_dims(torch.tensor(Z), k=1, tau=0.55)
    assert te.candidates == [0]
    assert te.median_mass == pytest.approx(0.55, abs=1e-6)
    te2 = stats.top_energy_dims(torch.tensor(Z), k=1, tau=0.56)
    assert te2.dims == [] and te2.candidates == [0]
    flat = torch.ones(6, 50)
    te3 = stats.top_energy_dims(flat, k=3)
    assert te3.dims == [] and te3.median_mass == pytest.approx(3 / 50, rel=1e-6)
    with pytest.raises(AssertionError):
        stats.top_energy_dims(torch.zeros(0, 5))


def test_k_for_fraction():
    Z = torch.tensor([[3.0, 4.0, 0.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    assert stats.k_for_fraction(Z, 0.25).tolist() == [1, 1, 3]
    assert stats.k_for_fraction(Z, 0.75).tolist() == [2, 3, 3]
    assert stats.k_for_fraction(Z, 0.99).tolist() == [2, 3, 3]
    assert stats.k_for_fraction(Z, 1.0).tolist() == [3, 3, 3]
    Z2 = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert stats.k_for_fraction(Z2, 0.25).tolist() == [1]  # c_1 == 0.25 exactly
    assert stats.k_for_fraction(Z2, 0.5).tolist() == [2]
    assert stats.k_for_fraction(Z2, 0.75).tolist() == [3]
    assert stats.k_for_fraction(Z2, 0.99).dtype == torch.int64


def test_k_for_fraction_matches_numpy(rng):
    Z = rng.normal(size=(30, 40)) * rng.uniform(0.1, 10, size=40)
    e = np.sort(Z.astype(np.float32).astype(np.float64) ** 2, axis=1)[:, ::-1]
    c = np.cumsum(e, axis=1) / e.sum(1, keepdims=True)
    for f in (0.25, 0.75, 0.99):
        expected = [int(np.argmax(row >= f)) + 1 for row in c]
        assert stats.k_for_fraction(torch.tensor(Z), f).tolist() == expected


# --------------------------------------------------------------------------- strings

@pytest.mark.parametrize("values, expected", [
    ([1, 1, 1], "1±0"),
    ([1.0, 1.02], "1±0"),                    # std 0.01 < 0.05
    ([2.5, 2.5, 2.5], "2±0"),                # banker's rounding
    ([3.5, 3.5], "4±0"),
    ([10, 24.8], "17±7"),                    # std 7.4
    ([0, 1200], "600±6e2"),
    ([0, 2468], "1234±1e3"),
    ([0, 1920], "960±1e3"),                  # mantissa 9.6 -> 10 carries to 1e3
    ([0, 190], "95±95"),
])
def test_mean_sd_string(values, expected):
    assert stats.mean_sd_string(values) == expected
    assert stats.mean_sd_string(torch.tensor(values, dtype=torch.float32)) == expected


def test_mean_sd_list_string():
    assert stats.mean_sd_list_string([[1, 1], [0, 1200]]) == "[1±0, 600±6e2]"


# --------------------------------------------------------------------------- spectra, bases

def test_eff_ranks():
    assert stats.eff_rank_entropy([1, 1, 1]) == pytest.approx(3.0)
    assert stats.eff_rank_participation([1, 1, 1]) == pytest.approx(3.0)
    assert stats.eff_rank_entropy([1, 0, 0]) == pytest.approx(1.0)
    assert stats.eff_rank_participation(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    lam = np.array([4.0, 2.0, 1.0, 0.5])
    p = lam / lam.sum()
    assert stats.eff_rank_entropy(lam) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert stats.eff_rank_participation(lam) == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum())
    assert stats.eff_rank_entropy([2, 2, -1e-9]) == pytest.approx(2.0)


def test_cosine_matrix(rng):
    V = rng.normal(size=(5, 12))
    C = stats.cosine_matrix(torch.tensor(V))
    u = np_unit(V)
    np.testing.assert_allclose(C.numpy(), u @ u.T, atol=1e-6)
    assert C.shape == (5, 5)


def test_canonical_sign():
    v = torch.tensor([0.1, -0.9, 0.3])
    assert stats.canonical_sign(v).tolist() == pytest.approx([-0.1, 0.9, -0.3])
    assert stats.canonical_sign(-v).tolist() == pytest.approx([-0.1, 0.9, -0.3])
    tie = torch.tensor([-2.0, 2.0, 1.0])  # first max-|.| entry is index 0 -> made positive
    assert stats.canonical_sign(tie).tolist() == [2.0, -2.0, -1.0]
    assert stats.canonical_sign(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_orthonormal_basis_drops_degenerate(rng):
    a, b = rng.normal(size=8), rng.normal(size=8)
    M = torch.tensor(np.stack([a, b, 2 * a], axis=1))
    Q = stats.orthonormal_basis(M)
    assert Q.shape == (8, 2) and Q.dtype == torch.float32
    np.testing.assert_allclose((Q.T @ Q).numpy(), np.eye(2), atol=1e-6)
    # span preserved: a and b lie in span(Q)
    for x in (a, b):
        x32 = torch.tensor(x, dtype=torch.float32)
        assert float((x32 - Q @ (Q.T @ x32)).norm()) < 1e-5 * float(x32.norm())
    assert stats.orthonormal_basis(torch.zeros(8, 3)).shape == (8, 0)
    assert stats.orthonormal_basis(torch.zeros(8, 0)).shape == (8, 0)
    M2 = torch.tensor(np.stack([a, np.zeros(8)], axis=1))
    assert stats.orthonormal_basis(M2).shape == (8, 1)


def test_project_out(rng):
    Q = stats.orthonormal_basis(torch.tensor(rng.normal(size=(10, 3))))
    X = torch.tensor(rng.normal(size=(4, 10)))
    P = stats.project_out(X, Q)
    assert P.dtype == torch.float32
    assert float((P @ Q).abs().max()) < 1e-5
    Xn = X.float().numpy()
    Qn = Q.double().numpy()
    np.testing.assert_allclose(P.numpy(), Xn - (Xn @ Qn) @ Qn.T, atol=1e-5)
    same = stats.project_out(X, torch.zeros(10, 0))
    assert same.dtype == torch.float32 and torch.equal(same, X.float())


def test_random_orthogonal_basis(rng):
    Q = stats.orthonormal_basis(torch.tensor(rng.normal(size=(16, 3))))
    B = stats.random_orthogonal_basis(Q, 4, seed=19)
    assert B.shape == (16, 4) and B.dtype == torch.float32
    np.testing.assert_allclose((B.T @ B).numpy(), np.eye(4), atol=1e-6)
    assert float((Q.T @ B).abs().max()) < 1e-6
    assert torch.equal(B, stats.random_orthogonal_basis(Q, 4, seed=19))
    B2 = stats.random_orthogonal_basis(Q, 4, seed=20)
    assert not torch.allclose(B, B2, atol=1e-3)
    full = stats.random_orthogonal_basis(Q, 13, seed=0)  # fills the complement exactly
    assert full.shape == (16, 13)
    with pytest.raises(ValueError):
        stats.random_orthogonal_basis(Q, 14, seed=0)


def test_second_moment_spectrum(rng):
    G = rng.normal(size=(30, 6)) * np.array([5, 1, 1, 0.5, 0.2, 0.1])
    lam, v1 = stats.second_moment_spectrum(torch.tensor(G))
    G32 = G.astype(np.float32).astype(np.float64)
    ev = np.sort(np.linalg.eigvalsh(G32.T @ G32 / 30))[::-1]
    assert lam.dtype == torch.float64 and v1.dtype == torch.float32
    np.testing.assert_allclose(lam.numpy(), ev, rtol=1e-9)
    _, V = np.linalg.eigh(G32.T @ G32 / 30)
    top = V[:, -1]
    top = top if top[np.argmax(np.abs(top))] > 0 else -top
    np.testing.assert_allclose(v1.numpy(), top, atol=1e-6)
    lam_wide, _ = stats.second_moment_spectrum(torch.tensor(G.T))  # N=6 < D=30
    assert lam_wide.shape == (6,)


# --------------------------------------------------------------------------- tests of means

def test_cohens_d():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0])
    pooled = math.sqrt((3 * np.var(a, ddof=1) + 2 * np.var(b, ddof=1)) / 5)
    assert stats.cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / pooled)
    assert stats.cohens_d([1, 1], [0, 0]) == math.inf
    assert stats.cohens_d([0, 0], [1, 1]) == -math.inf
    assert stats.cohens_d([1, 1], [1, 1]) == 0.0


def test_permutation_pvalue(rng):
    a = rng.normal(0.0, 1.0, size=30)
    b = rng.normal(3.0, 1.0, size=30)
    p_sep = stats.permutation_pvalue(a, b, n_perm=2000, seed=0)
    assert p_sep == pytest.approx(1 / 2001)
    c = rng.normal(0.0, 1.0, size=30)
    p_same = stats.permutation_pvalue(a, c, n_perm=2000, seed=0)
    assert p_same > 0.05
    assert p_same == stats.permutation_pvalue(a, c, n_perm=2000, seed=0)
    assert stats.permutation_pvalue([1.0, 1.0], [1.0, 1.0], n_perm=50) == 1.0


# --------------------------------------------------------------------------- fmt

def test_format_value():
    assert fmt.format_value(0.000123, "sci") == "1.2300e-04"
    assert fmt.format_value(1.5, "float") == "1.5000"
    assert fmt.format_value(None, "float") == "N/A"
    assert fmt.format_value(float("nan"), "sci") == "N/A"
    assert fmt.format_value("[1, 2]", "str") == "[1, 2]"
    assert fmt.format_value([1.0, -0.956, 0.0], "f2list") == "[1.00, -0.96, 0.00]"
    assert fmt.format_value(torch.tensor(2.0), "float") == "2.0000"
    with pytest.raises(ValueError):
        fmt.format_value(1.0, "bogus")


def test_format_table_exact():
    out = fmt.format_table(
        ["a", "bb"],
        [("x", [1.5, None], "float"),
         ("long", [0.000123, 2.0], "sci"),
         ("s", ["a" * 22, "ok"], "str")],
        title="T")
    expected = "\n".join([
        "T",
        " " * 6 + " " * 19 + "a" + " " * 18 + "bb",
        "x   " + "  " + " " * 14 + "1.5000" + " " * 17 + "N/A",
        "long" + "  " + " " * 10 + "1.2300e-04" + " " * 10 + "2.0000e+00",
        "s   " + "  " + "a" * 22 + " " * 18 + "ok",
    ])
    assert out == expected
    assert not out.endswith("\n")
    no_title = fmt.format_table(["c"], [("r", [1.0], "float")])
    assert no_title == "   " + " " * 19 + "c" + "\n" + "r  " + " " * 14 + "1.0000"
    with pytest.raises(AssertionError):
        fmt.format_table(["a", "b"], [("r", [1.0], "float")])


def test_format_matrix():
    out = fmt.format_matrix(["u", "vv"], torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    expected = "\n".join([
        "  " + " " * 9 + "u" + " " * 8 + "vv",
        "u " + "     1.000" + "    -0.500",
        "vv" + "    -0.500" + "     1.000",
    ])
    assert out == expected
