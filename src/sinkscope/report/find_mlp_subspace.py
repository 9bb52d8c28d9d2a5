"""--find-mlp-subspace: the [MLP subspace: ...] tables, find_mlp_subspace_L{L}.json (with the chosen dims and the
W_down basis, for reuse), the per-prompt z stacks (.npz), MLP_Z_topk_energy_stacks_L{L}.png and, for the residual
section, MLP_residual_decomp_dims_tok{t}_vs_tok{ref}_L{L}.png and MLP_Wu_row_contrib_to_dot_tok{t}_L{L}.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiments.find_mlp_subspace import FindMLPSubspaceResult
from ..fmt import format_table
from .common import atomic_file, notes_text, plt, save_fig
from .mlp_plots import columns, zstack_plot

RESULT = FindMLPSubspaceResult
SANITY = "reconstruction mean_rel_l2"


def _residual_plot(res, path: Path) -> Path:
    sec = res.residual
    names = sec.component_names
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(names)), 8), squeeze=False)
    x = np.arange(len(names))
    w = 0.8 / max(len(sec.picked_dims), 1)
    for ax, mean, std, lab in ((axes[0, 0], sec.tok_mean, sec.tok_std, f"tok{res.sink_tok}"),
                               (axes[1, 0], sec.diff_mean, sec.diff_std, f"tok{res.sink_tok} - tok{res.ref_tok}")):
        for i, d in enumerate(sec.picked_dims):
            ax.bar(x + (i - (len(sec.picked_dims) - 1) / 2) * w, [mean[n][i] for n in names], w,
                   yerr=[std[n][i] for n in names], capsize=2, label=f"dim {d}")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel(f"{lab} (mean ± sd over prompts)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(f"Components of the pre-MLP-norm stream s at the picked residual dims | L={res.layer} | "
                         f"rows of z dims {res.chosen_dims}", fontsize=9)
    fig.tight_layout()
    return save_fig(fig, path, dpi=200)


def _row_contrib_plot(res, path: Path) -> Path:
    sec = res.residual
    rows = [r for r in sec.rows if r.startswith("W_up") or r.startswith("W_in")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.2 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        e = np.asarray(sec.row_energy[r])
        ax.bar(np.arange(len(e)), e, width=1.0, color="tab:blue")
        for d in sec.row_top_dims[r]:
            ax.annotate(str(d), (d, e[d]), fontsize=7, ha="center", va="bottom")
        ax.set_ylabel("energy share", fontsize=8)
        ax.set_title(f"{r}: per-dim share of (w_d v_d)^2 in w.v, v = {sec.ranked_on} (no gain), tok{res.sink_tok} "
                     f"(mean over prompts)", fontsize=8)
    axes[-1, 0].set_xlabel("residual dim")
    fig.tight_layout()
    return save_fig(fig, path, dpi=200)


def table(result: FindMLPSubspaceResult) -> str:
    lines = [f"[Sanity check] {SANITY}={result.sanity_mean_rel_l2:.4e}  ({result.sanity_what} at "
             f"tok{result.sink_tok}, recomputed in fp32 from the captured factors)"]
    if result.empty_message:
        lines.append(f"[MLP subspace] {result.empty_message}")
    else:
        lines.append(f"[MLP subspace] chosen z dims {result.chosen_dims} ({result.dims_source}; top-energy test at "
                     f"tok{result.sink_tok}: candidates {result.te_candidates}, median mass "
                     f"{result.te_median_mass:.4f}, threshold {result.te_mass})")
    for t in result.tables:
        lines.append(format_table(t.columns, t.rows, title=t.title))
    lines += [f"[note] {n}" for n in result.section_notes]
    sec = result.residual
    if sec is not None:
        lines.append(f"[MLP residual decomp] auto-picked top dims: {sec.picked_dims} (most frequent among the top-3 "
                     f"contributors of rows {', '.join(sec.rows)}, ranked on {sec.ranked_on})")
        lines.append(f"[MLP residual decomp] components sum to s: max |sum - s| / max|s| = {sec.max_sum_mismatch:.2e}; "
                     f"norm(s) vs x: max rel = {sec.norm_check_rel:.2e}")
    lines.append(notes_text(result.notes))
    return "\n".join(filter(None, lines))


def json_name(result: FindMLPSubspaceResult) -> str:
    return f"find_mlp_subspace_L{result.layer}.json"


def _z_name(result: FindMLPSubspaceResult) -> str:
    return f"find_mlp_subspace_L{result.layer}_z.npz"


def payload(result: FindMLPSubspaceResult) -> dict:
    return {
        "layer": result.layer, "model_type": result.model_type, "gated": result.gated, "tokens": result.tokens,
        "sink_tok": result.sink_tok, "ref_tok": result.ref_tok, "sections": result.sections,
        SANITY: result.sanity_mean_rel_l2, "sanity_what": result.sanity_what,
        "tables": {t.title: t.as_dict() for t in result.tables},
        "chosen_dims": result.chosen_dims, "dims_source": result.dims_source, "te_k": result.te_k,
        "te_mass": result.te_mass, "te_dims": result.te_dims, "te_candidates": result.te_candidates,
        "te_median_mass": result.te_median_mass, "empty_message": result.empty_message,
        "W_down_columns": columns(result.W_down_columns), "W_down_Q": columns(result.W_down_Q),
        "stacks": result.stacks, "residual": result.residual, "section_notes": result.section_notes,
        "n_prompts": result.n_prompts, "z_file": _z_name(result), "notes": result.notes,
    }


def extra_files(result: FindMLPSubspaceResult, outdir: Path) -> list[Path]:
    arrays = {f"z_tok{t}": v.numpy().astype(np.float32) for t, v in result.z.items()}
    return [atomic_file(outdir / _z_name(result), lambda tmp: np.savez(tmp, **arrays))]


def plots(result: FindMLPSubspaceResult, outdir: Path) -> list[Path]:
    L, sec, out = result.layer, result.residual, []
    if "z" in result.sections:
        out.append(zstack_plot(outdir / f"MLP_Z_topk_energy_stacks_L{L}.png", result.stacks,
                               f"z energy stacks | L={L}"))
    if sec is not None and sec.picked_dims:
        out.append(_residual_plot(result, outdir / f"MLP_residual_decomp_dims_tok{result.sink_tok}_vs_tok"
                                                   f"{result.ref_tok}_L{L}.png"))
        out.append(_row_contrib_plot(result, outdir / f"MLP_Wu_row_contrib_to_dot_tok{result.sink_tok}_L{L}.png"))
    return out
