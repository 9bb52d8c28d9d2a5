"""Mode name -> function(ctx, args) -> result. The only place that maps CLI arguments onto experiments."""

from __future__ import annotations

from .decompose_output import run_decompose_output
from .scan import run_scan


def _scan(ctx, args):
    head = args.head if args.print_kind == "heatmap" else None
    return run_scan(ctx, sinks=args.sink_idx, interval=args.scan_interval, heatmap_head=head)


def _decompose_output(ctx, args):
    return run_decompose_output(ctx, layer=args.layer, tokens=args.tokens)


RUNNERS = {
    "scan": _scan,
    "decompose_output": _decompose_output,
}
