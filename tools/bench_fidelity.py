"""Fidelity and compute of ditopt presets and peer systems on the zoo models.

    python tools/bench_fidelity.py --seeds 4 --markdown docs/BENCHMARKS.md --png docs/bench_pareto.png

Same as ``ditopt bench``; the docstring of ``ditopt.bench`` (``ditopt/bench/__init__.py``) says what each
column measures.
"""

import argparse
import shlex
import sys

from ditopt.bench import add_arguments, run_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    run_from_args(parser.parse_args(argv), "python tools/bench_fidelity.py " + shlex.join(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
