"""Every writer goes through one target check and one lock (store.targets).

The race is real: a real ``magpie generate`` in a subprocess appends to its
output and its rejects file and holds their locks, while the real commands
that write files are pointed at them, by every name of the file.  The rest
runs the commands in process (CliRunner) or the store itself.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
from pathlib import Path

import pytest
from batch_helpers import assert_exact, gen_args, manifest_of, scripted_server, wait_for_lines
from magpie_cli import popen_magpie, run_magpie
from ollama_server import Delay, Hold
from test_output import make_record
from typer.testing import CliRunner

from magpie.cli.app import app
from magpie.errors import ExitStatus, UsageError
from magpie.store.atomic import AtomicOutput
from magpie.store.lock import OutputLock, OutputLocked
from magpie.store.targets import Targets

SRC = Path(__file__).resolve().parents[2] / "src" / "magpie"


def write_data(path: Path, n: int = 3, start: int = 0) -> bytes:
    text = "".join(
        make_record(
            i, instruction=f"Question {i} about tides?", response=f"A{i}."
        ).model_dump_json()
        + "\n"
        for i in range(start, start + n)
    )
    path.write_text(text)
    return text.encode()


_REJECT = make_record(99).model_dump(mode="json") | {"reject_reason": "duplicate"}


def rejects_line() -> str:
    """One line of a rejects file (the same each time)."""
    return json.dumps(_REJECT) + "\n"


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def refused(result, status: int = ExitStatus.USAGE, *words: str) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == status, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("magpie: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# -- the race: every writer meets a running generate's lock ---------------------------


def names_of(path: Path, tmp_path: Path) -> dict[str, str]:
    """Every kind of name of one file: the path, a symlink, a hard link, a
    relative path, a path through a symlinked folder, one with ``..``."""
    link, hard = tmp_path / f"link-{path.name}", tmp_path / f"hard-{path.name}"
    link.symlink_to(path)
    os.link(path, hard)
    (tmp_path / "sub").mkdir(exist_ok=True)
    if not (tmp_path / "dirlink").exists():
        (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    return {
        "path": str(path),
        "symlink": str(link),
        "hard link": str(hard),
        "relative": os.path.relpath(path, tmp_path),
        "symlinked folder": str(tmp_path / "dirlink" / path.name),
        "dot-dot": str(tmp_path / "sub" / ".." / path.name),
    }


def test_no_writer_replaces_a_file_a_running_generate_appends_to(tmp_path: Path) -> None:
    """dedup, export (jsonl, sqlite), stats --html, merge, filter and a second
    generate, each with --overwrite, at a running generate's output or rejects
    file by any of its names: all exit 4 and touch nothing; the run keeps all
    its records (on main, four of them renamed a new file over the output and
    the run's records went to the unlinked file)."""
    src = tmp_path / "src.jsonl"
    write_data(src)
    out, rej = tmp_path / "d.jsonl", tmp_path / "d.rejects.jsonl"
    rej.write_text(rejects_line())
    n = 10
    with scripted_server() as srv:
        # The run's first chat requests (its template renders, then answers)
        # pass; the next one is held until every writer has been tried.
        hold = Hold(timeout=240)
        srv.inject(Delay(0.0), times=6, path="/api/chat")
        srv.inject(hold, times=1, path="/api/chat")
        gen = popen_magpie(
            *gen_args(srv, out, n, "--seed", "5", "--concurrency", "1", "--rejects", str(rej))
        )
        try:
            assert hold.holding.wait(120), "the run never reached the held request"
            wait_for_lines(out, 1)
            before = out.read_bytes()
            writers = {
                "dedup": ["dedup", str(src), "-o", "{}"],
                "export openai": ["export", str(src), "--format", "openai", "-o", "{}"],
                "export sqlite": ["export", str(src), "--format", "sqlite", "-o", "{}"],
                "stats --html": ["stats", str(src), "--html", "{}"],
                "merge": ["merge", str(src), "-o", "{}"],
                "filter": ["filter", str(src), "-o", "{}"],
                "generate": gen_args(srv, "{}", 2),
                "dedup --rejects": ["dedup", str(src), "-o", "other.jsonl", "--rejects", "{}"],
                "filter --rejects": ["filter", str(src), "-o", "o2.jsonl", "--rejects", "{}"],
            }
            out_names = list(names_of(out, tmp_path).items())
            on_output = [c for c in writers if "--rejects" not in c]
            cases = [(cmd, *out_names[i % len(out_names)]) for i, cmd in enumerate(on_output)]
            cases += [("dedup", kind, name) for kind, name in out_names]
            rej_names = list(names_of(rej, tmp_path).items())
            on_rejects = ["export openai", "dedup --rejects", "filter --rejects"]
            cases += [
                (cmd, "rejects " + kind, name)
                for i, (kind, name) in enumerate(rej_names)
                for cmd in on_rejects[i % 3 : i % 3 + 1]
            ]
            for cmd, kind, name in cases:
                args = [a.replace("{}", name) for a in writers[cmd]]
                proc = run_magpie(*args, "--overwrite", cwd=tmp_path, timeout=120)
                assert proc.returncode == ExitStatus.LOCKED, (cmd, kind, proc.stderr)
                assert "another magpie run is writing" in proc.stderr, (cmd, kind)
                assert proc.stdout == "" and "Traceback" not in proc.stderr
                assert out.read_bytes() == before, (cmd, kind)
        finally:
            hold.release.set()
            _, err = gen.communicate(timeout=240)
    assert gen.returncode == 0, err
    assert f"{n} written" in err
    assert_exact(out, n)
    run = manifest_of(out).runs[-1]
    assert run.status == "done" and manifest_of(out).records == n
    assert rej.read_text().startswith(rejects_line())  # still the run's rejects file
    assert not (tmp_path / "other.jsonl").exists() and not (tmp_path / "o2.jsonl").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_new_name_claimed_by_one_writer_is_refused_to_another(tmp_path: Path) -> None:
    """A target that does not exist yet is claimed too: a replacing writer's
    claim (its locked temporary file) refuses a generate and a dedup of the
    same name, by another name of the folder too; a generate's new output
    refuses a dedup.  Nothing is left behind at release."""
    src = tmp_path / "src.jsonl"
    write_data(src)
    new = tmp_path / "new.jsonl"
    (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    targets = Targets()
    targets.replace("output", new)
    with targets.claim():
        assert not new.exists()
        for name in (str(new), "new.jsonl", str(tmp_path / "dirlink" / "new.jsonl")):
            for args in (
                ["dedup", str(src), "-o", name],
                ["generate", "-n", "1", "--host", "http://127.0.0.1:9", "--model", "m", "-o", name],
            ):
                proc = run_magpie(*args, cwd=tmp_path)
                assert proc.returncode == ExitStatus.LOCKED, (args, proc.stderr)
        assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirlink", "src.jsonl"]
    with OutputLock(new):  # what a starting generate holds
        proc = run_magpie("dedup", str(src), "-o", "new.jsonl", "--overwrite", cwd=tmp_path)
        assert proc.returncode == ExitStatus.LOCKED, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirlink", "src.jsonl"]


def test_the_lock_moves_onto_the_new_file_before_the_rename(tmp_path: Path) -> None:
    """A replaced target is never unlocked while its writer runs: the new file
    is locked before it is renamed into place, by every name."""
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    targets = Targets(overwrite=True)
    targets.replace("output", link)
    with targets.claim():
        with AtomicOutput(targets["output"]) as new:
            new.write(b"new\n")
        assert out.read_text() == "new\n" and link.is_symlink()
        for name in (out, link):
            with pytest.raises(OutputLocked):
                OutputLock(name).acquire()
    with OutputLock(out):
        pass  # released


def test_a_lock_taken_on_a_file_renamed_away_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between opening a name and locking it another writer may rename a new
    file over it: the lock then follows the name, never stays on the old file."""
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    real_flock = fcntl.flock
    swapped: list[bool] = []

    def flock(fd: int, op: int) -> None:
        if not swapped:
            swapped.append(True)
            newer = tmp_path / "newer"
            newer.write_text("new\n")
            os.replace(newer, out)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = OutputLock(out)
    lock.acquire()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()  # the file at the name now is the locked one
    finally:
        lock.release()


# -- targets that are other named files -------------------------------------------------


def test_sqlite_export_never_replaces_the_rejects_it_reads(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_data(data)
    db = tmp_path / "r.db"
    db.write_text(rejects_line())
    hard = tmp_path / "hard.db"
    os.link(db, hard)
    for rejects in (db, hard):
        result = invoke(
            "export", str(data), "--format", "sqlite", "-o", str(db), "--rejects", str(rejects),
            "--overwrite",
        )  # fmt: skip
        refused(result, ExitStatus.USAGE, "same file")
    assert db.read_text() == rejects_line()


def test_hf_export_never_removes_what_it_did_not_write(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_data(data)
    hf = tmp_path / "hf"
    ok = invoke("export", str(data), "--format", "hf", "-o", str(hf))
    assert ok.exit_code == 0, ok.output
    own = sorted(str(p.relative_to(hf)) for p in hf.rglob("*"))
    # The rejects file it was asked to read, inside the folder: refused.
    (hf / "rejects.jsonl").write_text(rejects_line())
    result = invoke(
        "export", str(data), "--format", "hf", "-o", str(hf),
        "--rejects", str(hf / "rejects.jsonl"), "--overwrite",
    )  # fmt: skip
    refused(result, ExitStatus.USAGE, "replaced whole")
    assert (hf / "rejects.jsonl").read_text() == rejects_line()
    # Anything in the folder that an earlier export did not write: refused.
    result = invoke("export", str(data), "--format", "hf", "-o", str(hf), "--overwrite")
    refused(result, ExitStatus.USAGE, "rejects.jsonl", "not part of an earlier magpie export")
    (hf / "rejects.jsonl").unlink()
    # Its own earlier export is replaced.
    again = invoke("export", str(data), "--format", "hf", "-o", str(hf), "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(str(p.relative_to(hf)) for p in hf.rglob("*")) == own
    # A folder of notes, other data, a clone with .git, a card of someone else.
    for extra, content in (
        ("notes.txt", "mine"),
        ("data/other.csv", "a,b\n"),
        (".git/HEAD", "ref: refs/heads/main\n"),
        ("images/photo.png", "png"),
    ):
        folder = tmp_path / f"f-{extra.replace('/', '-')}"
        folder.mkdir()
        (folder / extra).parent.mkdir(parents=True, exist_ok=True)
        (folder / extra).write_text(content)
        result = invoke("export", str(data), "--format", "hf", "-o", str(folder), "--overwrite")
        refused(result, ExitStatus.USAGE, "not part of an earlier magpie export")
        assert (folder / extra).read_text() == content
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("# My dataset\n")
    result = invoke("export", str(data), "--format", "hf", "-o", str(card), "--overwrite")
    refused(result, ExitStatus.USAGE, "README.md")
    assert (card / "README.md").read_text() == "# My dataset\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_named_file_is_a_sidecar_of_the_output(tmp_path: Path) -> None:
    """merge and dedup write the output's manifest and dedup index beside it:
    a --rejects (or input) named as one of them is refused (on main the
    rejects were written, then the manifest was renamed over them)."""
    data = tmp_path / "d.jsonl"
    write_data(data)
    for args in (
        ["merge", str(data), "-o", "all.jsonl", "--rejects", "all.jsonl.manifest.json"],
        ["merge", str(data), "-o", "all.jsonl", "--rejects", "all.jsonl.dedup.npz"],
        ["dedup", str(data), "-o", "u.jsonl", "--rejects", "u.jsonl.dedup.npz"],
    ):
        result = invoke(*args, "--overwrite")
        refused(result, ExitStatus.USAGE, "where magpie keeps the")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_generate_rejects_is_locked_and_filter_overwrite_empties_it_in_place(
    tmp_path: Path,
) -> None:
    data = tmp_path / "d.jsonl"
    write_data(data)
    rej = tmp_path / "r.jsonl"
    rej.write_text(rejects_line())
    with OutputLock(rej, "--rejects"):
        result = invoke(
            "filter", str(data), "-o", "kept.jsonl", "--rejects", str(rej), "--overwrite"
        )
        refused(result, ExitStatus.LOCKED, "another magpie run is writing")
    assert rej.read_text() == rejects_line()
    inode = rej.stat().st_ino
    result = invoke(
        "filter", str(data), "-o", "kept.jsonl", "--rejects", str(rej), "--overwrite",
        "--language", "de",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert rej.stat().st_ino == inode  # emptied in place: the lock stayed on it
    assert {json.loads(ln)["reject_reason"] for ln in rej.read_text().splitlines()} == {
        "language_en"
    }


def test_targets_refuse_before_creating_anything(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_data(data)
    targets = Targets()
    targets.read("input", data)
    targets.replace("output", data)
    with pytest.raises(UsageError, match="is the input .* \\(the same file\\)"):
        targets.claim()
    targets = Targets()
    targets.replace("output", tmp_path / "a.jsonl")
    targets.append("--rejects", tmp_path / "a.jsonl")
    with pytest.raises(UsageError, match="are the same file"):
        targets.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# -- the inventory: no command writes a file but through the store -------------------

#: Calls that create, replace or remove a file.  In commands/ and cli/ a file
#: is written only through store.targets and its writers (AtomicOutput,
#: AtomicFolder, JsonlWriter, RejectsWriter), which hold the one check and lock.
_FILE_CALLS = {
    ("os", "replace"), ("os", "rename"), ("os", "remove"), ("os", "unlink"),
    ("os", "truncate"), ("os", "ftruncate"), ("os", "rmdir"), ("os", "link"),
    ("shutil", "rmtree"), ("shutil", "move"), ("shutil", "copy"), ("shutil", "copyfile"),
    ("tempfile", "mkstemp"), ("tempfile", "mkdtemp"),
}  # fmt: skip
_FILE_METHODS = {"unlink", "rename", "rmdir", "touch", "write_text", "write_bytes", "symlink_to"}
_FILE_CLASSES = {"AtomicFile", "OutputLock"}


def _file_writes(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if (owner, f.attr) in _FILE_CALLS or f.attr in _FILE_METHODS:
                found.append(f"{owner or '...'}.{f.attr} (line {node.lineno})")
            elif owner == "os" and f.attr == "open":
                devnull = ast.unparse(node.args[0]) == "os.devnull" if node.args else False
                if not devnull:
                    found.append(f"os.open (line {node.lineno})")
        elif isinstance(f, ast.Name) and f.id in _FILE_CLASSES:
            found.append(f"{f.id} (line {node.lineno})")
        elif isinstance(f, ast.Name) and f.id == "open" and len(node.args) > 1:
            mode = ast.unparse(node.args[1])
            if any(c in mode for c in "wax+"):
                found.append(f"open({mode}) (line {node.lineno})")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(SRC)) for area in ("commands", "cli") for p in (SRC / area).rglob("*.py")
    ),
)
def test_commands_write_files_only_through_the_store(path: str) -> None:
    found = _file_writes(ast.parse((SRC / path).read_text("utf-8")))
    assert not found, f"{path} writes or removes a file itself: {found}"


def test_the_inventory_sees_a_writer_that_bypasses_the_store() -> None:
    tree = ast.parse(
        "import os, shutil\n"
        "def f(p, q):\n"
        "    os.replace(p, q); shutil.rmtree(q); q.unlink(); q.write_text('x')\n"
        "    AtomicFile(p); open(p, 'w'); os.open(p, os.O_WRONLY)\n"
        "    os.open(os.devnull, os.O_WRONLY); open(p); open(p, 'rb')\n"
    )
    assert len(_file_writes(tree)) == 7
