"""`--find-mlp-subspace --layer L --mlp z [g u residual]` (MODES.md section 3): which z dims (inputs of the down
projection) carry the sink token's MLP output, which W_down columns they write, and where their inputs come from.

Fixes (section 8): the residual rows come from the chosen z dims, not hard-coded ones; an empty top-energy set
is reported with what to do instead of crashing; --vec-idx really selects the dims; short prompts are counted,
not asserted; `a_explained_energy@top5_idx` is named after the k=5 set it uses; the sanity check is in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..result import Result
from .. import distributed, stats
from ..capture import Capture
from ..runner import RunContext, valid_rows
from .mlp_common import (DimChoice, Table, ZStackRow, check_te_args, choose_dims, mlp_math, tokens_for,
                         zstack_row)
from ..moe import is_moe_layer
from .moe_subspace import run_moe_subspace
from .mlp_residual import ResidualSection, residual_sites, run_residual_section

SECTIONS = ("z", "g", "u", "residual")
FRACS = (0.25, 0.75, 0.99)
A_TOPK = 5       # the reference's k for the act top-energy row
MAX_VALS = 3     # values shown by the *_max_vals rows


@dataclass
class FindMLPSubspaceResult(Result):
    layer: int
    model_type: str
    gated: bool
    tokens: list[int]
    sink_tok: int
    ref_tok: int
    sections: list[str]
    sanity_mean_rel_l2: float        # mean over prompts of ||z - act(g)*u|| / ||z|| at the sink token (fp32)
    sanity_what: str
    tables: list[Table]
    chosen_dims: list[int]
    dims_source: str                 # "top-energy" or "vec-idx"
    te_k: int
    te_mass: float
    te_dims: list[int]               # TE at the sink token (empty when the mass test fails)
    te_candidates: list[int]
    te_median_mass: float
    empty_message: str | None        # what happened and what to do, when no dims were chosen
    W_down_columns: torch.Tensor     # [D, k] the chosen columns of W_down (fp32)
    W_down_Q: torch.Tensor           # [D, r] orthonormal basis of their span (stats.orthonormal_basis)
    stacks: list[ZStackRow]
    residual: ResidualSection | None
    section_notes: list[str]
    n_prompts: list[int]             # prompts long enough, per token
    z: dict = field(default_factory=dict, repr=False)  # token -> [N, F] per-prompt z (NaN: prompt too short)
    notes: list[str] = field(default_factory=list)


def _entropy(V: torch.Tensor) -> float:
    p = stats.energy_fractions(V).double()
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    return float(h.mean())


def _vals(v: torch.Tensor, idx: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(v[i]):.2f}@{int(i)}" for i in idx) + "]"


def _mass(V: torch.Tensor, dims: list[int]) -> float:
    return float(stats.energy_fractions(V)[:, dims].double().sum(-1).mean()) if dims else 0.0


def top_mean_square_dims(Z: torch.Tensor, k: int) -> list[int]:
    """The k dims with the largest mean z^2 over the rows of Z [N, F] (descending; ties: lower index first).
    Not the top-energy candidates, which rank the mean *fraction* of each row's energy."""
    if Z.shape[0] == 0:
        return []
    ms = Z.double().pow(2).mean(0)
    return [int(i) for i in torch.sort(ms, descending=True, stable=True).indices[:k]]


def _z_table(stacks_in: dict, mm, tokens, sink_tok, chosen, k, tau, layer) -> Table:
    rows = {"z_norm": [], "z_frac_energy [.25/.75/.99]": [], f"z_topk_act_idx k={k}": [],
            f"W_down_cos_to_top1_aligned_vec k={k}": [], f"W_down_topk_act_norm k={k}": []}
    for t in tokens:
        Z = stacks_in[t]
        te = stats.top_energy_dims(Z, k=k, tau=tau)
        rows["z_norm"].append(stats.mean_sd_string(Z.norm(dim=-1)))
        rows["z_frac_energy [.25/.75/.99]"].append(
            stats.mean_sd_list_string([stats.k_for_fraction(Z, f) for f in FRACS]))
        rows[f"z_topk_act_idx k={k}"].append(str(te.dims))
        cos = None
        if t == sink_tok and chosen:
            cos = stats.cosine_matrix(mm.W_down[:, chosen].T)[0].tolist()
        rows[f"W_down_cos_to_top1_aligned_vec k={k}"].append(cos)
        top = top_mean_square_dims(Z, k)  # MODES.md section 3: the top-k by mean z^2, no mass test
        rows[f"W_down_topk_act_norm k={k}"].append(
            float(mm.W_down[:, top].norm(dim=0).mean()) if top else float("nan"))
    fmts = {"z_norm": "str", "z_frac_energy [.25/.75/.99]": "str", f"z_topk_act_idx k={k}": "str",
            f"W_down_cos_to_top1_aligned_vec k={k}": "f2list", f"W_down_topk_act_norm k={k}": "float"}
    return Table(f"[MLP subspace: Z/W_d] layer={layer}", [f"tok{t}" for t in tokens],
                 [(name, vals, fmts[name]) for name, vals in rows.items()])


def _g_table(G_by_tok: dict, mm, tokens, tau, layer) -> Table:
    names = ("g_entropy", "a_entropy", "g_pos/all", "g_max_vals (abs)", "g_max_vals (pos)", "a_max_vals (pos)",
             "a_norm", f"a_topk_act_idx k={A_TOPK}", f"a_explained_energy@top{A_TOPK}_idx")
    fmts = ("float", "float", "str", "str", "str", "str", "str", "str", "float")
    rows = {n: [] for n in names}
    for t in tokens:
        G = G_by_tok[t]
        A = mm.activate(G)
        gm, am = G.double().mean(0), A.double().mean(0)
        te = stats.top_energy_dims(A, k=A_TOPK, tau=tau)
        vals = (_entropy(G), _entropy(A), f"{stats.mean_sd_string((G > 0).sum(-1))}/{mm.F}",
                _vals(gm, torch.sort(gm.abs(), descending=True, stable=True).indices[:MAX_VALS]),
                _vals(gm, torch.sort(gm, descending=True, stable=True).indices[:MAX_VALS]),
                _vals(am, torch.sort(am, descending=True, stable=True).indices[:MAX_VALS]),
                stats.mean_sd_string(A.norm(dim=-1)), str(te.dims), _mass(A, te.candidates))
        for n, v in zip(names, vals):
            rows[n].append(v)
    return Table(f"[MLP subspace: G/A] layer={layer}", [f"tok{t}" for t in tokens],
                 [(n, rows[n], f) for n, f in zip(names, fmts)])


def _u_table(U_by_tok: dict, tokens, k, tau, layer) -> Table:
    rows = {"up_u_norm": [], f"up_u_tok_act_idx k={k}": [], f"u_explained_energy@top{k}_idx": []}
    for t in tokens:
        U = U_by_tok[t]
        te = stats.top_energy_dims(U, k=k, tau=tau)
        rows["up_u_norm"].append(stats.mean_sd_string(U.norm(dim=-1)))
        rows[f"up_u_tok_act_idx k={k}"].append(str(te.dims))
        rows[f"u_explained_energy@top{k}_idx"].append(_mass(U, te.candidates))
    fmts = ("str", "str", "float")
    return Table(f"[MLP subspace: U] layer={layer}", [f"tok{t}" for t in tokens],
                 [(n, v, f) for (n, v), f in zip(rows.items(), fmts)])


def capture_mlp(ctx: RunContext, layer: int, tokens: list[int], gated: bool, extra: dict | None = None,
                desc: str = "capture") -> dict[str, torch.Tensor]:
    """Capture x, g, (u), z at block `layer` (and `extra` sites) for `tokens`: {site: CPU fp32 [N, T, ...]},
    in prompt order; NaN where a prompt is too short."""
    sites = {f"blocks.{layer}.{s}": tokens for s in ("hook_mlp_in", "mlp.hook_pre", "mlp.hook_post")}
    if gated:
        sites[f"blocks.{layer}.mlp.hook_pre_linear"] = tokens
    sites.update(extra or {})
    N = len(ctx.prompts)
    out: dict[str, torch.Tensor] = {}
    def step(batch):
        for name, v in cap.forward(batch).items():
            v = v.float().cpu()
            if name not in out:
                out[name] = torch.full((N,) + tuple(v.shape[1:]), float("nan"))
            out[name][batch.index] = v

    with Capture(ctx.lm, sites) as cap:
        ctx.for_each(desc, step)
    out = distributed.merge_prompt_arrays(out, ctx.owned)   # data-parallel runs: every rank's prompts
    short = {f"blocks.{layer}.{s}": s for s in ("hook_mlp_in", "mlp.hook_pre", "mlp.hook_post",
                                                 "mlp.hook_pre_linear")}
    return {short.get(k, k): v for k, v in out.items()}


def run_find_mlp_subspace(ctx: RunContext, layer: int, sections=None, tokens=(0, 1, 8), sink_tok: int = 0,
                          ref_tok: int = 8, te_k: int = 3, te_mass: float = 0.55,
                          vec_idx=None) -> FindMLPSubspaceResult:
    lm = ctx.lm
    layer = ctx.check_layer(layer)
    if is_moe_layer(lm, layer):  # router choice, (expert, dim) decomposition, super weight: moe_subspace.py
        return run_moe_subspace(ctx, layer, tokens, sink_tok, ref_tok, te_k, te_mass, vec_idx)
    check_te_args(te_k, te_mass)
    sections = [s for s in SECTIONS if not sections or s in sections]
    tokens = tokens_for(ctx, *tokens, sink_tok, ref_tok)
    mm = mlp_math(lm, layer)
    parallel = lm.adapter.is_parallel(lm.config)
    extra = residual_sites(layer, parallel, tokens) if "residual" in sections else None
    cache = capture_mlp(ctx, layer, tokens, mm.gated, extra, desc=f"find-mlp-subspace L{layer}")
    x, g, z = cache["hook_mlp_in"], cache["mlp.hook_pre"], cache["mlp.hook_post"]
    u = cache.get("mlp.hook_pre_linear")
    ti, ri = tokens.index(sink_tok), tokens.index(ref_tok)

    # sanity: z against act(g) * u (or act(g)) recomputed in fp32 from the captured factors
    ok = ~torch.isnan(z[:, ti]).any(-1)
    z0 = z[:, ti][ok]
    rec = mm.z_from_factors(g[:, ti][ok], None if u is None else u[:, ti][ok])
    sanity = float(((z0 - rec).norm(dim=-1) / z0.norm(dim=-1).clamp_min(stats.EPS)).mean())

    by_tok = {t: valid_rows(z[:, i]) for i, t in enumerate(tokens)}
    choice: DimChoice = choose_dims(z[:, ti], vec_idx, te_k, te_mass, sink_tok, layer, mm.F)
    cols = mm.W_down[:, choice.dims].cpu()
    tables, section_notes, residual = [], [], None
    if "z" in sections:
        tables.append(_z_table(by_tok, mm, tokens, sink_tok, choice.dims, te_k, te_mass, layer))
    if ("g" in sections or "u" in sections) and not mm.gated:
        section_notes.append(f"sections g and u need a gated MLP; {lm.adapter.model_type} has a plain MLP "
                             f"(z = act(W_in x + b)), so they are skipped")
    if "g" in sections and mm.gated:
        tables.append(_g_table({t: valid_rows(g[:, i]) for i, t in enumerate(tokens)}, mm, tokens, te_mass, layer))
    if "u" in sections and mm.gated:
        tables.append(_u_table({t: valid_rows(u[:, i]) for i, t in enumerate(tokens)}, tokens, te_k, te_mass, layer))
    linear = [l for l in range(layer + 1) if l not in lm.attention_layers]
    if "residual" in sections and linear:
        section_notes.append(f"blocks {', '.join(map(str, linear))} have no softmax attention: their attn_i "
                             f"components are the {lm.adapter.linear_mixer} token mixer's outputs")
    if "residual" in sections:
        if choice.dims:
            residual = run_residual_section(lm, layer, parallel, mm, choice.dims, cache, x, ti, ri)
        else:
            section_notes.append("section residual is skipped: it reads the W rows of the chosen z dims, and "
                                 "none were chosen (see the top-energy message)")
    return FindMLPSubspaceResult(
        layer=layer, model_type=lm.adapter.model_type, gated=mm.gated, tokens=tokens, sink_tok=sink_tok,
        ref_tok=ref_tok, sections=sections, sanity_mean_rel_l2=sanity,
        sanity_what="z vs act(g)*u" if mm.gated else "z vs act(g)", tables=tables, chosen_dims=choice.dims,
        dims_source=choice.source, te_k=te_k, te_mass=te_mass, te_dims=choice.te.dims,
        te_candidates=choice.te.candidates, te_median_mass=choice.te.median_mass, empty_message=choice.message,
        W_down_columns=cols, W_down_Q=stats.orthonormal_basis(cols) if choice.dims else cols[:, :0],
        stacks=[zstack_row(f"tok{t}", by_tok[t]) for t in tokens], residual=residual,
        section_notes=section_notes, n_prompts=[int(by_tok[t].shape[0]) for t in tokens],
        z={t: z[:, i] for i, t in enumerate(tokens)}, notes=list(dict.fromkeys(ctx.notes)))
