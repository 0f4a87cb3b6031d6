#!/usr/bin/env python
"""Evaluate Vision Mamba (Vim, VideoMamba) and DeiT models with token reduction; see
:mod:`rmeeto.eval_cli` (``python eval.py --help``) for the settings and examples."""

import sys

from rmeeto.eval_cli import main

if __name__ == "__main__":
    sys.exit(main())
