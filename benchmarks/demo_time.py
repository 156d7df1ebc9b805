"""Wall time of the embedded demo end to end, and of its comparison against the static merges.

    python benchmarks/demo_time.py [--config configs/demo.yaml] [--methods ...] [--cold]

Runs the real commands a user types, each in its own process, into a fresh temporary folder:
``divmerge-pl fit`` (twice: the first run may build the demo's cache of data and experts; the
second shows the cost with everything cached) and ``divmerge-pl compare``. ``--cold`` also
empties the teacher cache first. Writes benchmarks/results/demo_time.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = "average,task_arithmetic,ties,dare,adamerging,divmerge_task,divmerge_layer"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--cold", action="store_true", help="empty the teacher cache first")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write_results

    cli = [sys.executable, "-m", "divmerge_pl.cli"]
    if args.cold:
        shutil.rmtree(Path("~/.cache/divmerge_pl/teachers").expanduser(), ignore_errors=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("fit (first run)", "fit (cached)"):
            run = Path(tmp) / label.split()[1].strip("()")
            command = [*cli, "fit", "--config", args.config, "--trainer.default_root_dir", str(run)]
            rows.append({"command": label, "seconds": timed(command)})
            print(f"{label}: {rows[-1]['seconds']:.0f} s", flush=True)
        out = Path(tmp) / "compare"
        command = [
            *cli,
            "compare",
            "--config",
            args.config,
            "--methods",
            args.methods,
            "--output_dir",
            str(out),
        ]
        rows.append({"command": f"compare ({args.methods})", "seconds": timed(command)})
        print(f"compare: {rows[-1]['seconds']:.0f} s", flush=True)
    print("\n| command | wall time |\n|---|---:|")
    for row in rows:
        print(f"| {row['command']} | {row['seconds'] / 60:.1f} min |")
    print(f"wrote {write_results('demo_time', {'config': args.config, 'results': rows})}")


if __name__ == "__main__":
    main()
