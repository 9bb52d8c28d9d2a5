"""Mode name -> function(ctx, args) -> result. The only place that maps CLI arguments onto experiments."""

from __future__ import annotations

from .ablate_mlp_out import run_ablate_mlp_out
from .decompose_mlp_in import run_decompose_mlp_in
from .decompose_output import run_decompose_output
from .find_mlp_subspace import run_find_mlp_subspace
from .scan import run_scan


def _scan(ctx, args):
    head = args.head if args.print_kind == "heatmap" else None
    return run_scan(ctx, sinks=args.sink_idx, interval=args.scan_interval, heatmap_head=head)


def _decompose_output(ctx, args):
    return run_decompose_output(ctx, layer=args.layer, tokens=args.tokens)


def _find_mlp_subspace(ctx, args):
    return run_find_mlp_subspace(ctx, layer=args.layer, sections=args.mlp, tokens=args.tokens,
                                 sink_tok=args.ablate_tok, ref_tok=args.ref_tok, te_k=args.te_k,
                                 te_mass=args.te_mass, vec_idx=args.vec_idx)


def _ablate_mlp_out(ctx, args):
    return run_ablate_mlp_out(ctx, layer=args.layer, mode=args.ablate_mlp_out, sink_tok=args.ablate_tok,
                              ref_tok=args.ref_tok, vec_idx=args.vec_idx, te_k=args.te_k, te_mass=args.te_mass,
                              seed=args.seed)


def _decompose_mlp_in(ctx, args):
    return run_decompose_mlp_in(ctx, layer=args.layer, sink_tok=args.ablate_tok, ref_tok=args.ref_tok,
                                vec_idx=args.vec_idx, te_k=args.te_k, te_mass=args.te_mass, seed=args.seed)


RUNNERS = {
    "scan": _scan,
    "decompose_output": _decompose_output,
    "find_mlp_subspace": _find_mlp_subspace,
    "ablate_mlp_out": _ablate_mlp_out,
    "decompose_mlp_in": _decompose_mlp_in,
}
