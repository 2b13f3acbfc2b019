"""``make bench``: one line per figure, ``BENCH <name> <value> <unit>`` and, where a
baseline ran beside it in the same script, `` vs <baseline> <ratio>x``.

Figures are ratios against a baseline run here and now, because these machines
are noisy; absolute numbers are for orientation only. Each benchmark runs in its
own process (the embedded ClickHouse allows one data path per process).
``make bench BENCH=settle`` runs one of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["framing", "pipeline", "loader_memory", "agent", "settle"]


def main() -> int:
    chosen = os.environ.get("BENCH", "").split(",") if os.environ.get("BENCH") else BENCHES
    failed = 0
    for name in chosen:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            print(f"# bench {name}: not present", file=sys.stderr)
            continue
        print(f"# bench {name} ...", file=sys.stderr, flush=True)
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_{name} as b\n"
            "for line in b.run(): print(line, flush=True)"
        )
        failed += subprocess.run([sys.executable, "-c", code]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
