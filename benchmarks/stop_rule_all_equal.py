"""How often the paper's stop rule fires on a buffer whose rewards are all equal, at the SFT warm start.

The main job stopped on a buffer of 16 correct episodes (reward 1 each). This gives every episode of each draw
reward 1 (what the checker gave that buffer) and counts the draws where no score is above 0, i.e. where the
paper's rule stops on a buffer that carries no reward signal. Run (real default model, cached warm start):

    .venv/bin/python benchmarks/stop_rule_all_equal.py --draws 20 --out reports/probes/stop-all-equal

Any ``ippo probe`` option may follow (e.g. ``--val-size 32``); ``--threads 1`` is the default here.
"""

from __future__ import annotations

import argparse
import sys

from ippo.train import probe
from ippo.train.cli import _add_config_options, _config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--out", default="reports/probes/stop-all-equal")
    _add_config_options(parser)
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    result = probe.probe(_config(args), args.out, args.draws, big_val_size=0, stability=False,
                         reward_fn=lambda completions, examples: [1.0] * len(completions))
    stops = result["summary"]["all_equal"]
    print(f"all-equal buffers: {stops['draws']}, the paper's rule stopped on {stops['paper_stop']}")


if __name__ == "__main__":
    main(sys.argv[1:])
