"""What the portable llama.cpp build costs where a native one runs.

README's install builds llama-cpp-python with ``CMAKE_ARGS="-DGGML_NATIVE=OFF
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"`` (AVX2, nothing newer) because a
native build (``-march=native``) dies on machines that advertise CPU features
they reject (AMX here: SIGSEGV at ``ldtilecfg``).  This compares, on the
default model (SmolLM2-135M-Instruct Q4_1), prompt and generation tokens per
second of:

* ``portable``: the README's ``CMAKE_ARGS``;
* ``native-noamx``: ``-DGGML_NATIVE=ON`` with AMX turned off.  ggml's
  ``GGML_AMX_*`` options only act on a non-native build; under ``-march=native``
  AMX is on wherever the compiler's ``__AMX_INT8__`` is, so they are given as
  ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` in ``CMAKE_C_FLAGS`` and
  ``CMAKE_CXX_FLAGS`` (GCC keeps explicit ``-mno-*`` over ``-march``'s);
* ``native``: a plain ``pip install llama-cpp-python`` (where it dies, the
  table says of what).

Only ``ggml-cpu`` (and ``ggml-base``, which it links) is compiled from the
installed version's sdist, in a throwaway directory: they are the only
libraries that get ``-march``/``-m`` flags (``compile_commands.json``: ``llama``
and ``ggml`` are ``-O3`` only), so each build's library directory is the
installed ``libllama``/``libggml`` beside its own ``libggml-cpu``/``libggml-base``,
loaded through ``LLAMA_CPP_LIB_PATH``.  The installed llama-cpp-python is never
touched.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
    python benchmarks/portable_build.py build --source /tmp/lcpp/llama_cpp_python-0.3.36 --work /tmp/lcpp
    flock /tmp/magpie-model.lock python benchmarks/portable_build.py measure --work /tmp/lcpp
    flock /tmp/magpie-model.lock python benchmarks/portable_build.py check-cost

``measure`` runs each build in its own process (one at a time), in rounds that
alternate the builds, and prints medians and each build's ratio to
``portable`` (the median of the per-round ratios).  ``check-cost`` times
:func:`magpie.backends.llamacpp.buildcheck.check_build` in a new process:
the first check of a build (the child) and a verified build (the cached
verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOAMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CONFIGS: dict[str, list[str]] = {
    "portable": ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"],
    "native-noamx": [
        "-DGGML_NATIVE=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        f"-DCMAKE_C_FLAGS={NOAMX}",
        f"-DCMAKE_CXX_FLAGS={NOAMX}",
    ],
    "native": ["-DGGML_NATIVE=ON"],
}
#: Built per configuration; the rest of a library directory is the installed build's.
BUILT = ("ggml-cpu", "ggml-base")
SHARED = ("llama", "ggml")

# One measurement: load the model, evaluate a prompt of PROMPT tokens (one
# batch: matrix x matrix) and decode GEN tokens one at a time (matrix x vector).
_MEASURE = """
import json, sys, time
import llama_cpp
model, prompt_tokens, gen_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=prompt_tokens + gen_tokens + 8, n_batch=prompt_tokens,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
words = b"The quick brown fox jumps over the lazy dog while the cat sleeps. " * 200
prompt = llm.tokenize(words, add_bos=True)[:prompt_tokens]
llm.eval(prompt[:8]); llm.reset()  # warm-up
start = time.perf_counter(); llm.eval(prompt); pp = time.perf_counter() - start
start = time.perf_counter()
for i in range(gen_tokens):
    llm.eval([prompt[i % len(prompt)]])
tg = time.perf_counter() - start
print(json.dumps({"prompt_tps": prompt_tokens / pp, "gen_tps": gen_tokens / tg}))
"""


def installed_lib() -> Path:
    import llama_cpp

    from magpie.backends.llamacpp.buildcheck import library_dir

    return library_dir(llama_cpp)


def lib_dir(work: Path, name: str) -> Path:
    return work / f"lib-{name}"


def build(source: Path, work: Path, names: list[str], jobs: int) -> None:
    """Configure and compile ``ggml-cpu`` for each configuration (under nice -n 19)."""
    installed = installed_lib()
    for name in names:
        bdir = work / f"build-{name}"
        cmd = ["cmake", "-S", str(source), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            cmd += ["-G", "Ninja"]
        subprocess.run(["nice", "-n", "19", *cmd, *CONFIGS[name]], check=True)
        subprocess.run(
            [
                "nice",
                "-n",
                "19",
                "cmake",
                "--build",
                str(bdir),
                "--target",
                "ggml-cpu",
                "-j",
                str(jobs),
            ],
            check=True,
        )
        out = lib_dir(work, name)
        out.mkdir(parents=True, exist_ok=True)
        for lib, src in [(n, bdir / "bin") for n in BUILT] + [(n, installed) for n in SHARED]:
            data = (src / f"lib{lib}.so").read_bytes()
            for target in (out / f"lib{lib}.so", out / f"lib{lib}.so.0"):
                target.write_bytes(data)
        print(f"{name}: {out}  (cmake {' '.join(CONFIGS[name])})", flush=True)


def measure_once(lib: Path, model: Path, args: argparse.Namespace) -> dict[str, float] | str:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            str(model),
            str(args.prompt),
            str(args.gen),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode < 0:
        import signal

        return f"died of {signal.Signals(-proc.returncode).name}"
    if proc.returncode:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> None:
    from magpie.backends.llamacpp.model import default_model_path

    model = default_model_path()
    libs = {name: lib_dir(args.work, name) for name in args.configs}
    libs = {n: p for n, p in libs.items() if p.exists()}
    if "portable" not in libs:
        raise SystemExit("no portable build under --work: run `build` first")
    results: dict[str, list[dict[str, float]]] = {n: [] for n in libs}
    failures: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, lib in libs.items():
            if name in failures:
                continue
            got = measure_once(lib, model, args)
            if isinstance(got, str):
                failures[name] = got
            else:
                results[name].append(got)
    load = os.getloadavg()[0]
    print(
        f"\n{model.name}, {args.prompt}-token prompt, {args.gen} tokens generated one at a time, "
        f"{args.threads} thread(s), {args.rounds} rounds alternating the builds; "
        f"CPU {cpu_name()}; load average {load:.2f}\n"
    )
    print(
        "| build | prompt tok/s | generation tok/s | prompt vs portable | generation vs portable |"
    )
    print("|---|---:|---:|---:|---:|")
    base = results["portable"]
    for name in libs:
        if name in failures:
            print(f"| {name} | {failures[name]} | | | |")
            continue
        rows = results[name]
        pp = statistics.median(r["prompt_tps"] for r in rows)
        tg = statistics.median(r["gen_tps"] for r in rows)
        rp = statistics.median(
            r["prompt_tps"] / b["prompt_tps"] for r, b in zip(rows, base, strict=True)
        )
        rg = statistics.median(r["gen_tps"] / b["gen_tps"] for r, b in zip(rows, base, strict=True))
        print(f"| {name} | {pp:.0f} | {tg:.1f} | {rp:.3f} | {rg:.3f} |")


def check_cost(args: argparse.Namespace) -> None:
    """``check_build()`` in a new process: first check vs cached verdict."""
    code = (
        "import time, llama_cpp\n"
        "from magpie.backends.llamacpp.buildcheck import check_build\n"
        "t = time.perf_counter(); check_build(); print(time.perf_counter() - t)\n"
    )
    first, cached = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as xdg:
            env = {**os.environ, "XDG_CACHE_HOME": xdg}
            for into in (first, cached):
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                into.append(float(out.stdout))
    print(
        f"check_build() in a new process, median of {args.rounds}: first check "
        f"{statistics.median(first) * 1e3:.0f} ms (the child), verified build "
        f"{statistics.median(cached) * 1e3:.1f} ms (hashing the libraries, reading the verdict)"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile ggml-cpu for each configuration")
    b.add_argument("--source", type=Path, required=True, help="the unpacked llama-cpp-python sdist")
    b.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "magpie-portable-build"
    )
    b.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    m = sub.add_parser("measure", help="tokens/s of each build (run under the model lock)")
    m.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "magpie-portable-build"
    )
    m.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--prompt", type=int, default=256, help="prompt tokens (one batch)")
    m.add_argument("--gen", type=int, default=64, help="tokens decoded one at a time")
    m.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("check-cost", help="the build check's cost: first vs cached")
    c.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.command == "build":
        started = time.perf_counter()
        build(args.source, args.work, args.configs, args.jobs)
        print(f"built in {time.perf_counter() - started:.0f} s")
    elif args.command == "measure":
        measure(args)
    else:
        check_cost(args)


if __name__ == "__main__":
    main()
