"""--decompose-mlp-in: Gram diagnostics, the projection gap (condition B), the sink table of the three runs,
decompose_mlp_in_L{L}.json and the reference's (HEAD) plots: mlp_in_eig_L{L}_tok{t}.png,
mlp_in_eig_proj_L{L}_tok{t}.png, mlp_in_ablate_Qproj_zstack_L{L}_tok{t}.png, mlp_in_ablate_Qproj_attnL{L}_tok{t}.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiments.decompose_mlp_in import DecomposeMLPInResult
from ..fmt import format_matrix, format_table
from . import effects
from .ablate_mlp_out import series_payload, sink_plot
from .common import notes_text, plt, save_fig
from .mlp_plots import columns, zstack_plot

RESULT = DecomposeMLPInResult
HIST_EDGES = 60


def _eig_plot(r: DecomposeMLPInResult, path: Path) -> Path:
    k = len(r.directions)
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 4), squeeze=False)
    for ax, d in zip(axes[0], r.directions):
        lam = np.asarray(d.eigvals)
        pos = lam[lam > 0]
        i = np.arange(1, len(pos) + 1)
        ax.semilogy(i, pos, marker=".", color="tab:blue")
        ax.set_xlabel("i")
        ax.set_ylabel("λ_i")
        ax.set_title(f"zdim={d.dim} | f=z[{d.dim}]^2", fontsize=9)
        tw = ax.twinx()
        tw.plot(i, np.cumsum(pos) / pos.sum() if pos.size else i, color="tab:orange")
        tw.set_ylim(0, 1.05)
        tw.set_ylabel("CDF", color="tab:orange")
    fig.suptitle(f"Active subspace spectrum | L={r.layer} tok={r.sink_tok} | f=z[idx]^2 | z_idx={r.chosen_dims}",
                 fontsize=10)
    fig.tight_layout()
    return save_fig(fig, path, dpi=200)


def _proj_plot(r: DecomposeMLPInResult, path: Path) -> Path:
    k = len(r.directions)
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 4), squeeze=False)
    for ax, d in zip(axes[0], r.directions):
        p0, pb = np.asarray(d.p0), np.asarray(d.pb)
        lo, hi = float(min(p0.min(), pb.min())), float(max(p0.max(), pb.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, HIST_EDGES)
        ax.hist(p0, bins=edges, density=True, alpha=0.6, label=f"tok{r.sink_tok}")
        ax.hist(pb, bins=edges, density=True, alpha=0.6, label=f"tok{r.ref_tok} (baseline)")
        ax.set_title(f"zdim={d.dim}: v1·(x - μ_b) | d={d.cohens_d:.3g}, p={d.perm_p:.2g}", fontsize=9)
        ax.set_xlabel("projection on v1 (canonical sign)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path, dpi=200)


def _projection_rows(r: DecomposeMLPInResult):
    rows = [(f"z{d.dim}", [f"{d.eigvals[0]:.4e}", f"{d.eigvals[1]:.4e}" if len(d.eigvals) > 1 else "N/A",
                           f"{d.p0_mean:.2f}±{d.p0_sd:.2f}", f"{d.pb_mean:.2f}±{d.pb_sd:.2f}",
                           f"{d.cohens_d:.2f}", f"{d.perm_p:.2e}"], "str") for d in r.directions]
    cols = ["lambda_1", "lambda_2", f"p0 (tok{r.sink_tok})", f"pb (tok{r.ref_tok})", "cohens_d", "perm_p"]
    return cols, rows


def table(result: DecomposeMLPInResult) -> str:
    r = result
    t = r.sink_tok
    lines = [f"[decompose_mlp_in] L={r.layer} tok={t} z_idx={r.chosen_dims}"]
    if r.empty_message:
        lines.append(f"[decompose_mlp_in] {r.empty_message}. Nothing else was computed.")
    else:
        names = [f"z{j}" for j in r.chosen_dims]
        lines.append(f"gradient of z_j^2 at tok{t} w.r.t. the MLP input: {r.grad_method}; v1 sign: the entry of "
                     f"largest |value| is positive")
        lines.append("Gram cosine matrix of the v1's:")
        lines.append(format_matrix(names, r.gram))
        lines.append(f"eigenvalues: {r.gram_eigs}")
        lines.append(f"energy frac: {r.energy_frac}")
        lines.append(f"cum frac: {r.cum_frac}")
        lines.append(f"eff_rank(entropy): {r.eff_rank_entropy:.3f}")
        lines.append(f"eff_rank(participation): {r.eff_rank_participation:.3f}")
        cols, rows = _projection_rows(r)
        lines.append(format_table(cols, rows, title=f"[Condition B] projection on v1 of x - mu_b (mu_b = mean "
                                                    f"x at tok{r.ref_tok}); perm_p: {r.n_perm} permutations, "
                                                    f"seed {r.seed}"))
        lines.append(format_table(r.sink_table.columns, r.sink_table.rows, title=r.sink_table.title))
        lines.append(f"[check] mean ||Q^T x|| / ||x|| at tok{t} after the edit: "
                     + ", ".join(f"{k} {v:.2e}" for k, v in r.x_residual_frac.items())
                     + f" (Q rank {r.rank}; rand⊥: rank {r.rank}, seed {r.seed}, orthogonal to span(Q))")
        lines.append("[z-stack] " + ", ".join(f"{s.label}: ‖z‖≈{s.mean_norm:.4g}" for s in r.stacks))
        lines.append(effects.tables(r.outcome, labels={"-span(rand⊥)": f"-span(rand⊥) (seed {r.seed})"}))
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: DecomposeMLPInResult) -> str:
    return f"decompose_mlp_in_L{result.layer}.json"


def payload(result: DecomposeMLPInResult) -> dict:
    r = result
    out = {"layer": r.layer, "model_type": r.model_type, "gated": r.gated, "grad_method": r.grad_method,
           "sink_tok": r.sink_tok, "ref_tok": r.ref_tok, "layers": r.layers, "z_idx": r.chosen_dims,
           "dims_source": r.dims_source, "te_median_mass": r.te_median_mass, "te_candidates": r.te_candidates,
           "empty_message": r.empty_message, "notes": r.notes}
    if r.empty_message:
        return out
    cols, rows = _projection_rows(r)
    out.update({
        "directions": r.directions, "gram_names": [f"z{j}" for j in r.chosen_dims], "gram": r.gram,
        "eigenvalues": r.gram_eigs, "energy frac": r.energy_frac, "cum frac": r.cum_frac,
        "eff_rank(entropy)": r.eff_rank_entropy, "eff_rank(participation)": r.eff_rank_participation,
        "projection_table": {n: dict(zip(cols, v)) for n, v, _ in rows},
        "rank": r.rank, "seed": r.seed, "n_perm": r.n_perm, "Q": columns(r.Q), "R": columns(r.R),
        "columns": r.sink_table.columns, "table": r.sink_table.as_dict(), "series": series_payload(r.series),
        "stacks": r.stacks, "x_residual_frac": r.x_residual_frac, **effects.payload(r.outcome)})
    return out


def plots(result: DecomposeMLPInResult, outdir: Path) -> list[Path]:
    r = result
    if r.empty_message:
        return []
    L, t = r.layer, r.sink_tok
    return [_eig_plot(r, outdir / f"mlp_in_eig_L{L}_tok{t}.png"),
            _proj_plot(r, outdir / f"mlp_in_eig_proj_L{L}_tok{t}.png"),
            zstack_plot(outdir / f"mlp_in_ablate_Qproj_zstack_L{L}_tok{t}.png", r.stacks,
                        f"z at L={L} before/after removing span(Q) from tok{t}'s MLP input"),
            sink_plot(outdir / f"mlp_in_ablate_Qproj_attnL{L}_tok{t}.png", r.layers, r.series, t,
                      f"Sink attention after removing span(Q) from tok{t}'s MLP input at L={L}")]
