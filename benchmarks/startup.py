"""Startup: wall time of ``magpie --help`` (and a few neighbours), and the imports
that cost the most.

Uses hyperfine when it is installed (``apt-get install hyperfine``), else a loop
of subprocess runs timed here.  Commands run through the venv's interpreter
(``python -m magpie`` and the ``magpie`` console script next to it); ``python -c
pass`` is the interpreter's own start, the floor no import work can go below.

Target (issue 5): ``magpie --help`` median <= 0.3 s.  Exit 1 when missed.  The
import breakdown (``python -X importtime -m magpie --help``) is printed either
way: the modules a lazy import would take off the path.

    python benchmarks/startup.py
    python benchmarks/startup.py --runs 50 --no-hyperfine
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, verdict  # noqa: E402

TARGET = 0.3


def commands() -> list[tuple[str, list[str]]]:
    py = sys.executable
    script = Path(py).with_name("magpie")
    magpie = [str(script)] if script.exists() else [py, "-m", "magpie"]
    return [
        ("python -c pass (interpreter floor)", [py, "-c", "pass"]),
        ("magpie --help", [*magpie, "--help"]),
        ("python -m magpie --help", [py, "-m", "magpie", "--help"]),
        ("magpie generate --help", [*magpie, "generate", "--help"]),
        ("magpie --version", [*magpie, "--version"]),
        ('python -c "import magpie"', [py, "-c", "import magpie"]),
    ]


def with_hyperfine(cmds: list[tuple[str, list[str]]], runs: int) -> dict[str, list[float]]:
    import shlex

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf.json"
        args = ["hyperfine", "-N", "--warmup", "3", "--runs", str(runs), "--export-json", str(out)]
        for name, cmd in cmds:
            args += ["--command-name", name, shlex.join(cmd)]
        subprocess.run(args, check=True, capture_output=True, text=True)
        data = json.loads(out.read_text())
    return {r["command"]: r["times"] for r in data["results"]}


def with_loop(cmds: list[tuple[str, list[str]]], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name, _ in cmds}
    for _ in range(3):  # warm-up: page cache, .pyc files
        for _, cmd in cmds:
            subprocess.run(cmd, capture_output=True, check=True)
    for _ in range(runs):  # interleaved, so load changes hit every command alike
        for name, cmd in cmds:
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    return times


def import_times(top: int) -> list[list[object]]:
    """Top modules by cumulative import time in ``-X importtime -m magpie --help``."""
    runs = []
    for _ in range(5):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "magpie", "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(proc.stderr)
    cumulative: dict[str, list[int]] = {}
    self_us: dict[str, list[int]] = {}
    for text in runs:
        for line in text.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, rest = line.split(":", 1)
            s, c, name = (x.strip() for x in rest.split("|"))
            cumulative.setdefault(name.strip(), []).append(int(c))
            self_us.setdefault(name.strip(), []).append(int(s))
    rows = []
    for name, cs in cumulative.items():
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append(
            [statistics.median(cs) / 1000, statistics.median(self_us[name]) / 1000, depth, name]
        )
    rows.sort(key=lambda r: -r[0])
    return [[f"{r[0]:.1f}", f"{r[1]:.1f}", r[3]] for r in rows[:top]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-hyperfine", action="store_true")
    parser.add_argument("--top", type=int, default=20, help="imports to list")
    args = parser.parse_args(argv)

    cmds = commands()
    use_hf = shutil.which("hyperfine") is not None and not args.no_hyperfine
    times = with_hyperfine(cmds, args.runs) if use_hf else with_loop(cmds, args.runs)
    print(f"Machine: {machine()}\n")
    print(
        f"Timer: {'hyperfine -N (no shell), 3 warm-ups' if use_hf else 'subprocess loop'}, "
        f"{args.runs} runs each.\n"
    )
    rows = []
    for name, _ in cmds:
        ts = times[name]
        rows.append(
            [
                name,
                1000 * min(ts),
                1000 * statistics.median(ts),
                1000 * statistics.mean(ts),
                1000 * max(ts),
            ]
        )
    print(table(["command", "min ms", "median ms", "mean ms", "max ms"], rows))
    print("\nSlowest imports of `python -X importtime -m magpie --help` (median of 5 runs)\n")
    print(table(["cumulative ms", "self ms", "module"], import_times(args.top)))
    median = statistics.median(times["magpie --help"])
    floor = statistics.median(times["python -c pass (interpreter floor)"])
    return verdict(
        [
            (
                f"magpie --help median {1000 * median:.0f} ms <= {1000 * TARGET:.0f} ms "
                f"(interpreter alone {1000 * floor:.0f} ms)",
                median <= TARGET,
            )
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
