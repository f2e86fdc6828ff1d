"""Run the benchmark cases and print flcore's figure, the baseline's, and their ratio.

    python -m bench                 # every case
    python -m bench A B --repeat 5  # some cases, more repetitions

Every figure is the median of ``--repeat`` runs, flcore and baseline alternating in the
same process, so that both see the same machine.
"""

from __future__ import annotations

import argparse
import sys

from bench import cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "cases",
        nargs="*",
        default=sorted(cases.CASES),
        help=f"cases to run (default all: {' '.join(sorted(cases.CASES))})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in cases.CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(cases.CASES)}")
    import torch

    # the baseline is single-threaded; flcore's clients use [job] threads = 1
    torch.set_num_threads(1)
    print(f"{'case':<6}{'what':<52}{'flcore':>12}{'baseline':>12}{'ratio':>8}  target")
    for name in args.cases:
        for row in cases.CASES[name](args.repeat):
            print(row.format(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
