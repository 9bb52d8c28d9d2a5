"""`explain`'s steps Where, Who, What and (B), computed from the observation pass (no forward pass here).

Each function returns the step's numbers as a JSON-ready dict (documented in docs/explain.md)."""

from __future__ import annotations

from collections import Counter

import torch

from .. import stats
from . import explain_stats as es
from .explain_core import ExplainThresholds
from .mlp_common import mlp_math

N_PERM = 10000   # permutation test draws, as decompose-mlp-in


def token0_info(lm, prompts) -> dict:
    """What token 0 is: the most frequent first token, and whether it is the BOS (or another special) token."""
    ids0 = [int(t[0]) for t in prompts.ids]
    tok = lm.tokenizer
    top, count = Counter(ids0).most_common(1)[0]
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    text = tok.decode([top]) if tok is not None else str(top)
    token = tok.convert_ids_to_tokens(top) if tok is not None else str(top)
    is_bos = bos is not None and all(i == bos for i in ids0)
    return {"text": text, "token": token, "id": top, "share": count / len(ids0), "is_bos": bool(is_bos),
            "is_special": bool(ids0) and all(i in special for i in ids0), "n_distinct": len(set(ids0)),
            "examples": [tok.decode([i]) if tok is not None else str(i) for i, _ in Counter(ids0).most_common(5)]}


def where(obs, t: ExplainThresholds, token0: dict) -> dict:
    ratios = es.layer_ratios(obs.norms)
    births = es.scan_births(ratios, t.birth_strong, t.birth_weak, t.massive_ratio)
    sink = [_mean(obs.sink[:, l]) for l in range(obs.sink.shape[1])]   # = mean over heads of the head means
    head_var = [float(torch.tensor(h, dtype=torch.float64).var(unbiased=False)) for h in obs.sink_heads]
    sink_layers = [l for l, s in enumerate(sink) if s == s and s > t.epsilon]
    large = [l for l, v in enumerate(ratios["mlp_ratio"]) if v == v and v >= t.massive_ratio
             and l not in births.birth_layers]
    return {"layers": list(range(len(sink))), "sink": sink, "sink_head_var": head_var,
            "n_prompts_sink": int(torch.isfinite(obs.sink).all(-1).sum()), **ratios,
            "runs": births.runs, "birth_layers": births.birth_layers, "minor_jumps": births.minor_jumps,
            "drops": births.drops, "embedding_massive": births.embedding_massive,
            "embedding_ratio": ratios["resid0_ratio"][0], "massive_layers": births.massive_layers,
            "sink_layers": sink_layers, "large_mlp_writes": large, "token0": token0, "tokens_compared": obs.labels[1:],
            "secondary_sinks": None}


def who(obs, layers, t: ExplainThresholds) -> list[dict]:
    """At each birth layer: token 0's r, a, m, y norms and the share of the jump a + m along a and along m."""
    out = []
    for l in layers:
        n = obs.norms[:, l]                                   # [N, 4, T]
        sh = es.writer_shares(n[:, 1, 0] ** 2, n[:, 2, 0] ** 2, obs.dot_am[:, l, 0])
        writer = "mlp" if sh["share_mlp"] >= t.who_share else "attention" if sh["share_attn"] >= t.who_share \
            else "mixed"
        out.append({"layer": l, "norm_r0": _mean(n[:, 0, 0]), "norm_a0": _mean(n[:, 1, 0]),
                    "norm_m0": _mean(n[:, 2, 0]), "norm_y0": _mean(n[:, 3, 0]),
                    "norm_a_others": es.nanmedian(n[:, 1, 1:]), "norm_m_others": es.nanmedian(n[:, 2, 1:]),
                    **sh, "writer": writer})
    return out


def _mean(x) -> float:
    x = x[torch.isfinite(x)]
    return float(x.double().mean()) if x.numel() else float("nan")


def _groups(x: torch.Tensor, labels: list[str]) -> dict[str, torch.Tensor]:
    """The baseline groups' rows of a [N, T, D] capture: tok1, tok8, random (every random column), NaN dropped."""
    out = {}
    for i, lab in enumerate(labels):
        if lab == "tok0":
            continue
        name = "random" if lab.startswith("rand") else lab
        rows = x[:, i]
        out[name] = torch.cat([out[name], rows]) if name in out else rows
    return {k: v[~torch.isnan(v).any(-1)] for k, v in out.items()}


def what_mlp(lm, l: int, z0: torch.Tensor, x: torch.Tensor, labels: list[str], t: ExplainThresholds,
             super_weight: dict | None) -> dict:
    """The z dims (adaptive k) that carry token 0's MLP output at block l, their W_down columns, and how much of
    the other tokens' z energy sits in the same dims."""
    mm = mlp_math(lm, l)
    ch = es.adaptive_k(z0, t.energy_mass, t.max_k)
    dims = ch["dims"]
    cols = mm.W_down[:, dims].cpu()
    Z0 = z0[~torch.isnan(z0).any(-1)]
    others = {}
    for name, rows in _groups(x, labels).items():
        if rows.shape[0]:
            frac = stats.energy_fractions(mm.z(rows.to(mm.W_gate.device)).cpu())[:, dims].double().sum(-1)
            others[name] = float(frac.median())
    sw = None
    if super_weight and super_weight.get("layer") == l:
        sw = {**super_weight, "col_in_dims": super_weight.get("col") in dims}
    why = (f"k={ch['k']}: the smallest k whose top-k z dims hold a median energy mass >= {t.energy_mass} at token 0 "
           f"({', '.join(f'k={i + 1}: {m:.4f}' for i, m in enumerate(ch['masses']))})" if ch["reached"] else
           f"no k <= {t.max_k} reaches a median energy mass of {t.energy_mass} at token 0 "
           f"(k={len(ch['masses'])}: {ch['masses'][-1]:.4f}); the top {ch['k']} dims are used")
    return {"layer": l, "kind": "mlp", **ch, "why": why, "energy_mass": t.energy_mass, "max_k": t.max_k,
            "mlp_kind": mm.kind, "z_norm0": stats.mean_norm(Z0) if Z0.shape[0] else float("nan"),
            "W_down_col_norms": cols.norm(dim=0).tolist(),
            "W_down_cos": stats.cosine_matrix(cols.T).tolist() if dims else [],
            "dims_energy_others": others, "super_weight": sw}


def what_attention(obs, l: int, t: ExplainThresholds) -> dict:
    """Which heads write token 0's attention output at block l: each head's median share of the pre-norm output."""
    share = es.nanmedian_dim(obs.head_share[:, l], 0)
    norm = es.nanmedian_dim(obs.head_norm[:, l], 0)
    order = torch.argsort(share, descending=True).tolist()
    cum, k = 0.0, len(order)
    for i, h in enumerate(order):
        cum += float(share[h])
        if cum >= t.energy_mass:
            k = i + 1
            break
    return {"layer": l, "kind": "attention", "heads": [{"head": h, "share": float(share[h]), "norm": float(norm[h])}
                                                       for h in order],
            "k_heads": k, "top_heads": order[:k], "check_rel_err": obs.head_check[l]}


def geometric(lm, l: int, dims: list[int], x: torch.Tensor, labels: list[str], x_shuf0: torch.Tensor | None,
              shuffled_same: float | None, t: ExplainThresholds, seed: int) -> dict:
    """(B) at block l: for each chosen z dim j, v1 = the top direction of d z_j^2 / dx at token 0 (decompose-mlp-in's
    gradient subspace); token 0's MLP input projected on v1 against each baseline group's."""
    mm = mlp_math(lm, l)
    X0 = x[:, 0][~torch.isnan(x[:, 0]).any(-1)]
    groups = _groups(x, labels)
    if x_shuf0 is not None:
        groups["shuffled"] = x_shuf0[~torch.isnan(x_shuf0).any(-1)]
    centre = "tok8" if groups.get("tok8") is not None and groups["tok8"].shape[0] else "tok1"
    directions = []
    for j in dims:
        G = mm.grad(X0.to(mm.W_gate.device), j).cpu()
        lam, v1 = stats.second_moment_spectrum(G)
        mu = float((groups[centre] @ v1).double().mean()) if groups.get(centre) is not None else 0.0
        p0 = (X0 @ v1).double() - mu
        flipped = bool(p0.mean() < 0)      # v1's sign is arbitrary: orient it so that token 0 sits on the + side,
        if flipped:                        # so d > 0 means token 0 lies further along it than the group
            v1, mu, p0 = -v1, -mu, -p0
        comp = {}
        for name, rows in groups.items():
            comp[name] = es.group_comparison(p0, (rows @ v1).double() - mu, N_PERM, seed)
        directions.append({"dim": j, "eig1_frac": float(lam[0] / lam.sum()) if float(lam.sum()) > 0 else float("nan"),
                           "flipped": flipped, "groups": comp})
    informative = {name: True for name in groups}
    if "shuffled" in informative and shuffled_same is not None and shuffled_same >= 1.0:
        informative["shuffled"] = False
    return {"layer": l, "dims": dims, "primary_dim": dims[0], "centred_on": centre, "directions": directions,
            "informative": informative, "shuffled_same_token0": shuffled_same, "n_perm": N_PERM,
            "grad_method": "closed form" if mm.gated else "autograd"}
