"""`--find-mlp-subspace` section residual: which residual dims feed the chosen z dims, and where in the residual
stream (embedding, attn_i, mlp_i for i < L, attn_L) their values at the sink token come from.

The rows read are those of the chosen z dims (W_gate and W_up rows for gated MLPs, W_in rows otherwise), never
the reference's hard-coded 8518/422/5723 (MODES.md section 8). Each row's contributors are ranked on the
normalised stream without the norm's gain (MODES.md section 3): s / rms(s) for RMSNorm families,
(s - mean) / std for LayerNorm families (the adapter's norm_kind), s itself where the MLP has no input norm
(OLMo 2); not on the gamma-scaled MLP input x, whose non-uniform gain would pick other dims. The components are captured at
`blocks.0.hook_resid_pre` (embedding), `blocks.i.hook_attn_out` / `hook_mlp_out` (i < L) and, for sequential
blocks, `blocks.L.hook_attn_out`; they sum to s, the input of the pre-MLP norm (checked, and s -> norm -> x
is checked against the captured MLP input).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .. import stats
from ..arch import mlp_input_norm, normalised_stream
from .mlp_common import MLPMath

TOP_CONTRIB = 3   # each row's top contributors
N_PICK = 2        # residual dims picked


def residual_sites(layer: int, parallel: bool, tokens) -> dict:
    sites = {"blocks.0.hook_resid_pre": tokens}
    for i in range(layer):
        sites[f"blocks.{i}.hook_attn_out"] = tokens
        sites[f"blocks.{i}.hook_mlp_out"] = tokens
    sites[f"blocks.{layer}.hook_resid_pre"] = tokens
    if not parallel:
        sites[f"blocks.{layer}.hook_attn_out"] = tokens
    return sites


def component_names(layer: int, parallel: bool) -> list[str]:
    names = ["embedding"]
    for i in range(layer):
        names += [f"attn_{i}", f"mlp_{i}"]
    if not parallel:
        names.append(f"attn_{layer}")
    return names


def components(cache: dict, layer: int, parallel: bool) -> dict[str, torch.Tensor]:
    """{component name: [N, T, D]} from a residual_sites capture."""
    out = {"embedding": cache["blocks.0.hook_resid_pre"]}
    for i in range(layer):
        out[f"attn_{i}"] = cache[f"blocks.{i}.hook_attn_out"]
        out[f"mlp_{i}"] = cache[f"blocks.{i}.hook_mlp_out"]
    if not parallel:
        out[f"attn_{layer}"] = cache[f"blocks.{layer}.hook_attn_out"]
    return out


@dataclass
class ResidualSection:
    rows: list[str]                      # the W rows read, e.g. "W_gate[1229]"
    row_top_dims: dict[str, list[int]]   # each row's top-3 contributing residual dims at the sink token
    picked_dims: list[int]               # the N_PICK most frequent (ties: larger total energy share)
    component_names: list[str]
    tok_mean: dict[str, list[float]]     # component -> mean value at each picked dim, sink token
    diff_mean: dict[str, list[float]]    # component -> mean of (sink - ref) per prompt at each picked dim
    diff_std: dict[str, list[float]]
    tok_std: dict[str, list[float]]
    max_sum_mismatch: float              # max |sum of components - s| / max |s|
    norm_check_rel: float                # max ||norm(s) - x|| / ||x|| over prompts at the sink token
    n_prompts: int
    n_pairs: int
    row_energy: dict[str, list[float]] = field(default_factory=dict)  # row -> per-dim energy share (the u plot)
    ranked_on: str = "s / rms(s)"        # the stream the row contributors are ranked on (no gain, no bias)


def _rows(mm: MLPMath, dims: list[int]) -> dict[str, torch.Tensor]:
    rows = {}
    for j in dims:
        if mm.gated:
            rows[f"W_gate[{j}]"] = mm.W_gate[j]
            rows[f"W_up[{j}]"] = mm.W_up[j]
        else:
            rows[f"W_in[{j}]"] = mm.W_gate[j]
    return rows


def row_energy_shares(x_tok: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of the per-dim share of (w_d x_d)^2 in sum_d (w_d x_d)^2 (the dot product w.x)."""
    c = (x_tok.double() * w.to(x_tok.device).double().view(1, -1)) ** 2
    return (c / c.sum(-1, keepdim=True).clamp_min(stats.EPS)).mean(0)


def run_residual_section(lm, layer: int, parallel: bool, mm: MLPMath, dims: list[int], cache: dict,
                         x: torch.Tensor, ti: int, ri: int) -> ResidualSection:
    """cache: the capture (CPU fp32, [N, T, D]); x: captured MLP input [N, T, D]; ti / ri: the sink and
    reference token's column in T."""
    comps = components(cache, layer, parallel)
    names = component_names(layer, parallel)
    r = cache[f"blocks.{layer}.hook_resid_pre"]
    s = r if parallel else r + cache[f"blocks.{layer}.hook_attn_out"]
    total = sum(comps[n] for n in names)
    ok_tok = ~torch.isnan(s[:, ti]).any(-1)
    scale = float(s[:, ti][ok_tok].abs().max()) if ok_tok.any() else 1.0
    mismatch = float((total - s).nan_to_num().abs().max()) / max(scale, stats.EPS)
    # s -> the block's pre-MLP norm (if any) -> x, at the sink token
    a = lm.adapter
    norm = mlp_input_norm(a, lm.layers[layer], lm.config)
    s_tok = s[:, ti][ok_tok]
    if norm is None:
        xs = s_tok
    else:
        with torch.inference_mode():
            p = next(norm.parameters(), None)
            dev, dt = (p.device, p.dtype) if p is not None else (lm.device, lm.dtype)
            xs = norm(s_tok.to(dev, dt)).float().cpu()
    x_tok = x[:, ti][ok_tok]
    norm_rel = float(((xs - x_tok).norm(dim=-1) / x_tok.norm(dim=-1).clamp_min(stats.EPS)).max()) \
        if x_tok.shape[0] else float("nan")
    s_hat, ranked_on = ranking_stream(s_tok, a.norm_kind if norm is not None else None)

    rows = _rows(mm, dims)
    row_top, row_energy, total_share, counts = {}, {}, torch.zeros(x.shape[-1], dtype=torch.float64), Counter()
    for name, w in rows.items():
        e = row_energy_shares(s_hat, w)
        row_energy[name] = e.tolist()
        top = [int(i) for i in torch.sort(e, descending=True, stable=True).indices[:TOP_CONTRIB]]
        row_top[name] = top
        counts.update(top)
        total_share += e
    picked = sorted(counts, key=lambda d: (-counts[d], -float(total_share[d]), d))[:N_PICK]

    pair_ok = ok_tok & ~torch.isnan(s[:, ri]).any(-1)
    tok_mean, tok_std, diff_mean, diff_std = {}, {}, {}, {}
    for n in names:
        v = comps[n][:, :, picked] if picked else comps[n][:, :, :0]
        vt = v[:, ti][ok_tok].double()
        dv = (v[:, ti] - v[:, ri])[pair_ok].double()
        tok_mean[n], tok_std[n] = vt.mean(0).tolist(), vt.std(0, unbiased=False).tolist()
        diff_mean[n], diff_std[n] = dv.mean(0).tolist(), dv.std(0, unbiased=False).tolist()
    return ResidualSection(
        rows=list(rows), row_top_dims=row_top, picked_dims=picked, component_names=names, tok_mean=tok_mean,
        diff_mean=diff_mean, diff_std=diff_std, tok_std=tok_std, max_sum_mismatch=mismatch,
        norm_check_rel=norm_rel, n_prompts=int(ok_tok.sum()), n_pairs=int(pair_ok.sum()), row_energy=row_energy,
        ranked_on=ranked_on)


def ranking_stream(s_tok: torch.Tensor, norm_kind: str | None) -> tuple[torch.Tensor, str]:
    """(the stream the row contributors are ranked on, its name): s normalised as the pre-MLP norm does, without
    its gain and bias; s itself when the MLP input is not normalised."""
    if norm_kind is None:
        return s_tok.float(), "s (the MLP input is not normalised)"
    return normalised_stream(s_tok, norm_kind), {"rms": "s / rms(s)", "layer": "(s - mean(s)) / std(s)"}[norm_kind]
