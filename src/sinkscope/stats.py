"""Pure numerical helpers shared by every sinkscope mode (no model code, no printing).

Conventions
-----------
* Every tensor input is cast to float32 first (so results do not depend on the capture
  dtype beyond its values); reductions and accumulators then work in float64 for stability.
* Shapes are checked with loud ``assert`` statements.
* Definitions follow MODES.md section 0 ("Shared definitions"); the fixes of section 8
  that live here are noted in the docstrings (degenerate-basis filter, SVD sign convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

EPS = 1e-12

__all__ = [
    "EPS", "unit", "mean_norm", "spread", "NormSpread", "MeanVar", "head_reduce",
    "energy_fractions", "TopEnergy", "top_energy_dims", "k_for_fraction",
    "mean_sd_string", "mean_sd_list_string", "eff_rank_entropy", "eff_rank_participation",
    "cosine_matrix", "canonical_sign", "orthonormal_basis", "project_out",
    "random_orthogonal_basis", "cohens_d", "permutation_pvalue", "second_moment_spectrum",
    "bootstrap_ci", "mean_std",
]


def _f32(x) -> Tensor:
    """Any array-like -> float32 tensor (device unchanged)."""
    return torch.as_tensor(x).to(torch.float32)


def _f64(x) -> Tensor:
    """Values rounded to float32 first, then widened to float64 for the arithmetic."""
    return _f32(x).to(torch.float64)


def _np1d(values) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to(torch.float64).cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr


def _matrix(X, name: str = "X") -> Tensor:
    X = _f32(X)
    assert X.dim() == 2, f"{name} must be 2-D [N, D], got shape {tuple(X.shape)}"
    return X


# --------------------------------------------------------------------------- norms, spread

def unit(X: Tensor) -> Tensor:
    """Unit-normalise along the last dim: x / max(||x||, EPS). Returns float32."""
    X = _f32(X)
    assert X.dim() >= 1, "unit() needs at least one dimension"
    n = torch.linalg.vector_norm(X.to(torch.float64), dim=-1, keepdim=True).clamp_min(EPS)
    return (X.to(torch.float64) / n).to(torch.float32)


def _norms_units64(X: Tensor) -> tuple[Tensor, Tensor]:
    """Row norms and unit rows of a [N, D] matrix, computed in float64 on CPU."""
    X64 = X.detach().to(torch.float64).cpu()
    norms = torch.linalg.vector_norm(X64, dim=-1)
    return norms, X64 / norms.clamp_min(EPS).unsqueeze(-1)


def _spread_from(n: int, usum: Tensor, dim: int) -> float:
    if n < 2:
        return float("nan")  # undefined for fewer than 2 vectors (the reference printed 0.0)
    ubar = usum / n
    return math.sqrt(max(0.0, 1.0 - float(ubar @ ubar)) / dim)


def mean_norm(X: Tensor) -> float:
    """Reference "norm": mean over rows of the L2 norm of each row. NaN for N == 0."""
    X = _matrix(X)
    if X.shape[0] == 0:
        return float("nan")
    norms, _ = _norms_units64(X)
    return float(norms.sum() / X.shape[0])


def spread(X: Tensor) -> float:
    """Reference "cloud radius" of a stack of N vectors of dimension D.

    u_n = x_n / max(||x_n||, EPS); ubar = mean_n u_n (not renormalised);
    spread = sqrt(max(0, 1 - ||ubar||^2) / D) = sqrt(mean_n ||u_n - ubar||^2 / D).
    Returns NaN when N < 2: a spread of fewer than two vectors is undefined (the reference printed 0.0).
    """
    X = _matrix(X)
    N, D = X.shape
    if N < 2:
        return float("nan")
    _, u = _norms_units64(X)
    return _spread_from(N, u.sum(0), D)


class NormSpread:
    """Streaming ``mean_norm`` and ``spread`` over batches of vectors (memory O(D)).

    Keeps the count, the float64 sum of row norms and the float64 sum of unit rows (CPU).
    """

    def __init__(self, dim: int):
        assert int(dim) > 0, f"dim must be positive, got {dim}"
        self.dim = int(dim)
        self._n = 0
        self._norm_sum = 0.0
        self._usum = torch.zeros(self.dim, dtype=torch.float64)

    def update(self, X: Tensor) -> None:
        """Add a batch X of shape [n, dim] (n may be 0)."""
        X = _matrix(X)
        assert X.shape[1] == self.dim, f"expected last dim {self.dim}, got {tuple(X.shape)}"
        if X.shape[0] == 0:
            return
        norms, u = _norms_units64(X)
        self._n += X.shape[0]
        self._norm_sum += float(norms.sum())
        self._usum += u.sum(0)

    @property
    def n(self) -> int:
        return self._n

    def norm(self) -> float:
        return self._norm_sum / self._n if self._n else float("nan")

    def spread(self) -> float:
        return _spread_from(self._n, self._usum, self.dim)


class MeanVar:
    """Streaming mean and population variance (ddof=0) of a quantity of fixed ``shape``.

    Batches are merged with Chan et al.'s parallel algorithm in float64 (CPU).
    """

    def __init__(self, shape=()):
        if not isinstance(shape, (tuple, list, torch.Size)):
            shape = (shape,)
        self.shape = tuple(int(s) for s in shape)
        self._n = 0
        self._mean = torch.zeros(self.shape, dtype=torch.float64)
        self._m2 = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Add a batch x of shape [n, *shape]."""
        x = _f32(x).detach().cpu().to(torch.float64)
        assert x.dim() == 1 + len(self.shape) and tuple(x.shape[1:]) == self.shape, (
            f"expected [n, *{self.shape}], got {tuple(x.shape)}")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self._n + nb
        delta = mb - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2b + delta ** 2 * (self._n * nb / n)
        self._n = n

    @property
    def n(self) -> int:
        return self._n

    def mean(self) -> Tensor:
        """float64 tensor of ``shape`` (NaN-filled if nothing was added)."""
        return self._mean.clone() if self._n else torch.full(self.shape, float("nan"), dtype=torch.float64)

    def var(self) -> Tensor:
        """Population variance, float64 tensor of ``shape`` (NaN if empty)."""
        return self._m2 / self._n if self._n else torch.full(self.shape, float("nan"), dtype=torch.float64)


def head_reduce(per_head: Tensor) -> tuple[float, float]:
    """(mean across heads, population variance across heads) of a [H] vector."""
    v = _f64(per_head)
    assert v.dim() == 1 and v.numel() > 0, f"per_head must be non-empty 1-D, got {tuple(v.shape)}"
    m = v.mean()
    return float(m), float(((v - m) ** 2).mean())


# --------------------------------------------------------------------------- energy

def _fractions64(Z: Tensor) -> Tensor:
    Z64 = _matrix(Z, "Z").to(torch.float64)
    e = Z64 ** 2
    tot = e.sum(-1, keepdim=True)
    return torch.where(tot > 0, e / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(e))


def energy_fractions(Z: Tensor) -> Tensor:
    """p[n, i] = Z[n, i]^2 / sum_j Z[n, j]^2 (float32); all-zero rows give zeros."""
    return _fractions64(Z).to(torch.float32)


@dataclass
class TopEnergy:
    """Result of :func:`top_energy_dims`. ``dims`` is empty when the median mass < tau."""

    dims: list[int]
    median_mass: float
    mean_frac: Tensor
    candidates: list[int]


def top_energy_dims(Z: Tensor, k: int = 3, tau: float = 0.55) -> TopEnergy:
    """Top-energy dims TE(Z, k, tau) of a stack Z [N, F] (MODES.md section 0).

    m_i = mean_n p_{n,i}; candidates = the k indices with largest m_i, descending
    (ties broken by lower index); mass_n = sum over candidates of p_{n,i};
    median_mass = numpy.median(mass); dims = candidates if median_mass >= tau else [].
    ``mean_frac`` is m (float32). k is capped at F.
    """
    p = _fractions64(Z)
    N, F = p.shape
    assert N > 0, "top_energy_dims needs at least one row"
    assert k >= 1, f"k must be >= 1, got {k}"
    k = min(int(k), F)
    m = p.mean(0)
    order = torch.sort(m, descending=True, stable=True).indices[:k]
    cand = [int(i) for i in order]
    mass = p[:, order].sum(-1).numpy()
    med = float(np.median(mass))
    return TopEnergy(dims=list(cand) if med >= tau else [], median_mass=med,
                     mean_frac=m.to(torch.float32), candidates=cand)


def k_for_fraction(Z: Tensor, f: float) -> Tensor:
    """Per row: smallest k such that the top-k squared entries hold >= f of the energy.

    Cumulative fractions are computed in float64 and normalised by the row's own final
    cumulative sum (so c_F == 1 exactly). f >= 1 gives F; an all-zero row gives F
    (for f > 0). Returns int64 [N].
    """
    Z64 = _matrix(Z, "Z").to(torch.float64)
    N, F = Z64.shape
    if f >= 1:
        return torch.full((N,), F, dtype=torch.int64)
    c = torch.sort(Z64 ** 2, dim=-1, descending=True).values.cumsum(-1)
    tot = c[:, -1:]
    c = torch.where(tot > 0, c / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(c))
    hit = c >= f
    k = hit.to(torch.int64).argmax(-1) + 1
    return torch.where(hit.any(-1), k, torch.full_like(k, F))


# --------------------------------------------------------------------------- strings

def _sd_string(sd: float) -> str:
    if sd < 0.05:
        return "0"
    if sd < 100:
        return str(round(sd))
    e = math.floor(math.log10(sd))
    mant = round(sd / 10 ** e)
    if mant == 10:
        mant, e = 1, e + 1
    return f"{mant}e{e}"


def mean_sd_string(values) -> str:
    """Reference "μ±σ": mean rounded half-to-even; population std shown as "0" (< 0.05),
    a rounded integer (< 100) or a one-digit mantissa with exponent, e.g. "6e2"."""
    v = _np1d(values)
    assert v.size > 0, "mean_sd_string needs at least one value"
    return f"{round(float(v.mean()))}±{_sd_string(float(v.std()))}"


def mean_sd_list_string(list_of_values) -> str:
    """"[a±b, c±d, ...]" — one :func:`mean_sd_string` per sequence."""
    return "[" + ", ".join(mean_sd_string(v) for v in list_of_values) + "]"


# --------------------------------------------------------------------------- spectra, bases

def eff_rank_entropy(eigs) -> float:
    """exp(entropy) of p = clip(eigs, 0) / sum (0 log 0 = 0). 0.0 if all eigs <= 0."""
    lam = np.clip(_np1d(eigs), 0.0, None)
    s = lam.sum()
    if s <= 0:
        return 0.0
    p = lam[lam > 0] / s
    return float(np.exp(-(p * np.log(p)).sum()))


def eff_rank_participation(eigs) -> float:
    """Participation ratio (sum λ)^2 / sum λ^2 of clip(eigs, 0). 0.0 if all eigs <= 0."""
    lam = np.clip(_np1d(eigs), 0.0, None)
    q = (lam ** 2).sum()
    return float(lam.sum() ** 2 / q) if q > 0 else 0.0


def cosine_matrix(V: Tensor) -> Tensor:
    """Pairwise cosines of the rows of V [k, D] (float32 [k, k]); zero rows give 0."""
    V = _matrix(V, "V")
    _, u = _norms_units64(V)
    return (u @ u.T).to(torch.float32).to(V.device)


def canonical_sign(v: Tensor) -> Tensor:
    """Fixed orientation for sign-ambiguous vectors (e.g. singular vectors, fix 8.9).

    The vector is negated if needed so that its entry of largest absolute value is
    positive; on ties the first such index decides. A zero vector is returned unchanged.
    Floating inputs keep their dtype; others are cast to float32.
    """
    v = torch.as_tensor(v)
    if not v.is_floating_point():
        v = v.to(torch.float32)
    assert v.dim() == 1 and v.numel() > 0, f"canonical_sign needs a non-empty 1-D vector, got {tuple(v.shape)}"
    i = int(np.argmax(np.abs(v.detach().to(torch.float64).cpu().numpy())))  # first max
    return -v if float(v[i]) < 0 else v.clone()


def orthonormal_basis(M: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis [D, r] (float32) of the column span of M [D, k].

    Uses the SVD of M in float64 and keeps left singular vectors with
    s > rtol * s_max and s > 0, so linearly dependent or zero columns are dropped
    (fix 8.6: the reference's QR filter never removed them). Each basis vector is
    oriented with :func:`canonical_sign`. A zero (or empty) M gives shape [D, 0].
    """
    M64 = _matrix(M, "M").to(torch.float64).cpu()
    D, k = M64.shape
    if k == 0 or D == 0:
        return torch.zeros(D, 0, dtype=torch.float32)
    U, S, _ = torch.linalg.svd(M64, full_matrices=False)
    smax = float(S.max())
    keep = (S > rtol * smax) & (S > 0)
    if not bool(keep.any()):
        return torch.zeros(D, 0, dtype=torch.float32)
    cols = [canonical_sign(U[:, j]) for j in torch.nonzero(keep).flatten().tolist()]
    return torch.stack(cols, dim=1).to(torch.float32)


def project_out(X: Tensor, Q: Tensor) -> Tensor:
    """X - (X @ Q) @ Q^T in float32, for X [..., D] and orthonormal Q [D, r]."""
    X = _f32(X)
    Q = _matrix(Q, "Q").to(X.device)
    assert X.shape[-1] == Q.shape[0], f"X last dim {X.shape[-1]} != Q rows {Q.shape[0]}"
    if Q.shape[1] == 0:
        return X.clone()
    return X - (X @ Q) @ Q.T


def random_orthogonal_basis(Q: Tensor, r: int, seed: int) -> Tensor:
    """Random orthonormal basis [D, r] (float32) orthogonal to span(Q) (Q: [D, r_q]).

    Draws a Gaussian D x r matrix from ``torch.Generator('cpu').manual_seed(seed)``,
    projects out span(Q) (in float64, twice, against an orthonormalised Q) and
    orthonormalises it with :func:`orthonormal_basis`. If the result has rank < r it
    retries with seed + 997*t for t = 1..10, then raises ValueError. Deterministic per seed.
    """
    Qb = orthonormal_basis(Q).to(torch.float64)
    D = Qb.shape[0]
    assert r >= 0, f"r must be >= 0, got {r}"
    for t in range(11):
        g = torch.Generator(device="cpu").manual_seed(int(seed) + 997 * t)
        G = torch.randn(D, r, generator=g, dtype=torch.float32).to(torch.float64)
        for _ in range(2):
            G = G - Qb @ (Qb.T @ G)
        B = orthonormal_basis(G)
        if B.shape[1] == r:
            return B
    raise ValueError(f"could not draw a rank-{r} basis orthogonal to a rank-{Qb.shape[1]} "
                     f"subspace of dimension {D} (seed {seed}, 11 tries)")


def second_moment_spectrum(G: Tensor) -> tuple[Tensor, Tensor]:
    """Uncentred second-moment spectrum of G [N, D].

    Returns (eigenvalues s_i^2 / N of G^T G / N, descending, float64 [min(N, D)],
    top right singular vector with :func:`canonical_sign` orientation, float32 [D]).
    """
    G64 = _matrix(G, "G").to(torch.float64).cpu()
    N, D = G64.shape
    assert N > 0 and D > 0, f"second_moment_spectrum needs a non-empty matrix, got {(N, D)}"
    _, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    lam = torch.sort(S ** 2 / N, descending=True).values
    return lam, canonical_sign(Vh[0]).to(torch.float32)


# --------------------------------------------------------------------------- tests of means

def cohens_d(a, b) -> float:
    """(mean a - mean b) / pooled std, pooled = sqrt(((na-1) s_a^2 + (nb-1) s_b^2) / (na+nb-2))
    with ddof=1 variances. Zero pooled std gives ±inf, or 0.0 when the means are equal."""
    a, b = _np1d(a), _np1d(b)
    na, nb = a.size, b.size
    assert na >= 1 and nb >= 1 and na + nb > 2, f"cohens_d needs na, nb >= 1 and na+nb > 2, got {na}, {nb}"
    diff = float(a.mean() - b.mean())
    ss = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
    sd = math.sqrt(ss / (na + nb - 2))
    if sd == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / sd


def permutation_pvalue(a, b, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation test of |mean(a) - mean(b)|.

    Labels are shuffled with ``numpy.random.default_rng(seed)``;
    p = (1 + #{perm stat >= observed}) / (1 + n_perm). The comparison allows a
    relative slack of 1e-12 so that permutations equal to the observed split
    (up to summation rounding) count as ties.
    """
    a, b = _np1d(a), _np1d(b)
    na, nb = a.size, b.size
    assert na >= 1 and nb >= 1 and n_perm >= 1
    pooled = np.concatenate([a, b])
    obs = abs(a.mean() - b.mean())
    thr = obs - 1e-12 * max(1.0, obs)
    rng = np.random.default_rng(seed)
    count, done = 0, 0
    while done < n_perm:
        m = min(1000, n_perm - done)
        perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
        stat = np.abs(perm[:, :na].mean(1) - perm[:, na:].mean(1))
        count += int((stat >= thr).sum())
        done += m
    return (1 + count) / (1 + n_perm)


# --------------------------------------------------------------------------- spread over prompts and controls

N_BOOT = 2000          # bootstrap resamples
BOOT_BLOCK = 500       # resamples drawn at a time (memory: BOOT_BLOCK x n indices)


def bootstrap_ci(values, seed: int, n_boot: int = N_BOOT, level: float = 0.95, weights=None) -> list[float]:
    """Percentile bootstrap CI of the mean over prompts: resample the n finite values with replacement n_boot
    times (numpy default_rng(seed)), take the (1-level)/2 and 1-(1-level)/2 quantiles of the resampled means.
    weights: per-value weights (e.g. token counts), giving the weighted mean sum(w v) / sum(w) per resample.
    NaN values (and their weights) are dropped; none left -> [nan, nan]; one -> [v, v]."""
    assert 0.0 < level < 1.0 and n_boot >= 1, (level, n_boot)
    v = _np1d(values)
    w = np.ones_like(v) if weights is None else _np1d(weights)
    assert w.shape == v.shape, f"weights {w.shape} do not match values {v.shape}"
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    v, w = v[ok], w[ok]
    if v.size == 0:
        return [math.nan, math.nan]
    if v.size == 1:
        return [float(v[0]), float(v[0])]
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, BOOT_BLOCK):
        idx = rng.integers(0, v.size, size=(min(BOOT_BLOCK, n_boot - start), v.size))
        means.append((v[idx] * w[idx]).sum(1) / w[idx].sum(1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def mean_std(values, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1: the sample std) of the finite values; std is 0.0 for one value and
    both are NaN for none."""
    v = _np1d(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=ddof)) if v.size > ddof else 0.0
