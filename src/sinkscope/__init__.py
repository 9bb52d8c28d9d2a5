"""sinkscope: find out how attention sinks form in transformer language models.

    import sinkscope as ss
    lm = ss.load()                      # the built-in SmolLM2-135M-Instruct (offline)
    res = ss.decompose_output(lm, ss.prompts(), layer=11)
    print(res.table())

The API lives in sinkscope.api; its names are re-exported here lazily, so that `sinkscope --help` and flag
checks do not pay for importing torch.
"""

__version__ = "0.2.0"

_API = ("load", "prompts", "tokenized", "invoked_as", "scan", "decompose_output", "find_mlp_subspace",
        "ablate_mlp_out", "decompose_mlp_in", "ablate_router", "explain", "explain_compare", "metrics",
        "ablate_super_weight")
__all__ = [*_API, "__version__"]


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'sinkscope' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
