"""matsim's reference adapter with one planted bug: what the vectors and `matsim fuzz` are
measured against. A test-side launcher, so that product code never reaches into tests:

    python -m tests.planted_adapter BUG     # then speaks the protocol on stdin/stdout
"""
import sys

import pytest

from tests.planted_bugs import BUGS, plant


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in BUGS:
        print(f"usage: python -m tests.planted_adapter BUG (one of {', '.join(sorted(BUGS))})", file=sys.stderr)
        return 2
    plant(pytest.MonkeyPatch(), args[0])
    from sim.conformance import main as serve   # after planting: the module proper, where the bug lands
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
