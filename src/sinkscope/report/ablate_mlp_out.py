"""--ablate-mlp-out: the sink-attention table, ablate_mlp_out_{mode}_L{L}.json and the reference's plot
ablate_mlp_out_ablate_{mode}_L{L}_token_{t}[_vec...]_L{L}.png."""

from __future__ import annotations

from pathlib import Path

from ..experiments.ablate_mlp_out import AblateMLPOutResult
from ..fmt import format_table
from . import effects
from .common import notes_text, progression_plot
from .mlp_plots import columns

RESULT = AblateMLPOutResult


def series_payload(series: dict) -> dict:
    return {name: None if s is None else {"mean": s.mean, "head_var": s.head_var, "n_prompts": s.n_prompts,
                                          "mean_over_layers": s.mean_over_layers()}
            for name, s in series.items()}


def sink_plot(path: Path, layers, series: dict, key: int, title: str) -> Path:
    data = {name: (s.mean, s.head_var) for name, s in series.items() if s is not None}
    return progression_plot(path, layers, data, f"Attn(Q[q>=max(4,t+1)] -> K[{key}]) (var across heads)", title,
                            "probability")


def table(result: AblateMLPOutResult) -> str:
    r = result
    t = r.sink_tok
    lines = []
    if r.mode == "magnitude":
        a = r.alpha or {}
        lines.append(f"[ablate-mlp-out] mode=magnitude L={r.layer}: m at tok{t} scaled to the norm of tok{r.ref_tok}'s, "
                     f"per prompt, cap 1.0 (alpha mean {a.get('mean', float('nan')):.4g}, min "
                     f"{a.get('min', float('nan')):.4g}, max {a.get('max', float('nan')):.4g}); layer_input_ablated "
                     f"and random_control are N/A for magnitude (a rescaling removes no subspace)")
    elif r.empty_message:
        lines.append(f"[ablate-mlp-out] {r.empty_message}. Only the baseline was measured.")
    else:
        src = "--vec-idx" if r.dims_source == "vec-idx" else (f"top-energy at tok{t}, median mass "
                                                            f"{r.te_median_mass:.4f}")
        lines.append(f"[ablate-mlp-out] mode=direction L={r.layer}: span of {r.basis_space} {r.chosen_dims} ({src}), "
                     f"rank {r.rank}, removed from tok{t}'s MLP output; random_control: a rank-{r.rank} subspace "
                     f"orthogonal to it, seed {r.seed}")
        lines.append(f"[check] after the edit, mean ||Q^T m|| / ||m|| at tok{t} = {r.residual_frac:.2e}")
    lines.append(format_table(r.sink_table.columns, r.sink_table.rows, title=r.sink_table.title))
    lines.append(f"[counts] {r.n_measured} prompts measured (queries q >= max(4, t+1))")
    lines.append(effects.tables(r.outcome, labels={"random_control": f"random_control (seed {r.seed})"}))
    lines.append(notes_text(r.notes))
    return "\n".join(filter(None, lines))


def json_name(result: AblateMLPOutResult) -> str:
    return f"ablate_mlp_out_{result.mode}_L{result.layer}.json"


def payload(result: AblateMLPOutResult) -> dict:
    r = result
    return {
        "layer": r.layer, "mode": r.mode, "model_type": r.model_type, "sink_tok": r.sink_tok, "ref_tok": r.ref_tok,
        "layers": r.layers, "columns": r.sink_table.columns, "table": r.sink_table.as_dict(),
        "series": series_payload(r.series), "chosen_dims": r.chosen_dims, "dims_source": r.dims_source,
        "te_median_mass": r.te_median_mass, "te_candidates": r.te_candidates, "empty_message": r.empty_message,
        "rank": r.rank, "seed": r.seed, "basis_space": r.basis_space, "Q": columns(r.Q), "R": columns(r.R),
        "alpha": r.alpha, "residual_frac": r.residual_frac, "n_measured": r.n_measured, "notes": r.notes,
        **effects.payload(r.outcome),
    }


def plots(result: AblateMLPOutResult, outdir: Path) -> list[Path]:
    r = result
    name = f"ablate_mlp_out_ablate_{r.mode}_L{r.layer}_token_{r.sink_tok}{r.vec_suffix}_L{r.layer}.png"
    return [sink_plot(outdir / name, r.layers, r.series, r.sink_tok,
                      f"Attention score before/after ablation={r.mode} | L={r.layer} | token={r.sink_tok}")]
