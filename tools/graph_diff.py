"""The graph of a model before and after ditopt's passes, as an HTML page, a text diff or DOT.

The same as ``ditopt diff`` (this script only forwards its arguments):

    python tools/graph_diff.py wan --preset fora-2                  # ditopt-diff-wan.html
    python tools/graph_diff.py hunyuan --plan my-plan.yaml --format text -o -
    python tools/graph_diff.py dit-digits --preset fora-3-block --format dot -o dit.dot

The library behind it is ``ditopt.graphdiff`` (``graph_diff(model, plan, **inputs)``).
"""

import sys

import torch

from ditopt.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(["diff", *sys.argv[1:]]))
