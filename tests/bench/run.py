"""``make bench``: one line per figure, ``BENCH <name> <value> <unit>`` and, where a
baseline ran beside it in the same process, `` vs <baseline> <ratio>x``.

Figures are ratios against a baseline run here and now, because these machines
are noisy; absolute numbers are for orientation only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_framing


def main() -> None:
    for line in bench_framing.run():
        print(line, flush=True)


if __name__ == "__main__":
    main()
