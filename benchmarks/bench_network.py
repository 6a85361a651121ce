"""The shaped-network benchmark (``torchkit.apps.netbench``), writing under ``benchmarks/results/<device>/``.

sudo python benchmarks/bench_network.py [--rates 1gbit 100mbit] [--ranks 2 4] ...   # --help for the rest
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchkit.apps.netbench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(out=str(Path(__file__).resolve().parent / "results")))
