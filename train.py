"""Re-train a token-reduced Vision Mamba with LightningCLI (:mod:`rmeeto.lit.cli`).

    python train.py fit --config configs/demo.yaml
    python train.py fit --config configs/demo.yaml --ckpt_path last      # resume the killed run
    python train.py validate --config configs/demo.yaml --ckpt_path last
    python train.py fit --config configs/demo.yaml --print_config        # the merged config
    python train.py --debug fit ...                                      # tracebacks for known errors too

See docs/launch.md for SLURM, torchrun and multi-node runs.
"""

import sys

from rmeeto.lit.cli import RMeeToCLI, main, run

__all__ = ["RMeeToCLI", "main", "run"]

if __name__ == "__main__":
    sys.exit(run())
