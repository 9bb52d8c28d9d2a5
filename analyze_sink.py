#!/usr/bin/env python
"""Reference-compatible entry point: `python analyze_sink.py --scan --print qkv` == `sinkscope --scan --print qkv`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from sinkscope.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
