"""Every field of a record reaches every output (issue 20, item 4).

One record with EVERY field set, built from the record model itself (a field
added to :class:`~magpie.records.Record` or a model inside it is set here too,
or :func:`fill` raises on a type it does not know), goes through each export
and comes back field by field: JSONL -> hf (read with the real ``datasets``),
JSONL -> sqlite (read with the real ``sqlite3``), JSONL -> each JSONL format
where it has a place for the field.  The manifest records every setting.
"""

from __future__ import annotations

import json
import re
import sqlite3
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from magpie.commands.export import CARRIES, FORMATS, NO_PLACE, convert, export_file
from magpie.records import GuardTags, GuardVerdict, JudgeTags, Message, Record, StageInfo

#: An extra key for every model that allows extra keys (a line written by a
#: later magpie, or by a user's own tool, keeps it through every export).
EXTRA_KEY = "added_by_a_later_version"


def fill(annotation: Any, path: str) -> Any:
    """A value of ``annotation``, never None, unique to ``path``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return fill(next(a for a in get_args(annotation) if a is not type(None)), path)
    if origin is Literal:
        return get_args(annotation)[-1]
    if origin is list:
        return [fill(get_args(annotation)[0], f"{path}[{i}]") for i in range(2)]
    if origin is dict:
        key_type, value_type = get_args(annotation)
        assert key_type is str, annotation
        return {k: fill(value_type, f"{path}.{k}") for k in ("instruction", "response")}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return fill_model(annotation, path)
    if annotation is str:
        return f"<{path}>"
    if annotation is bool:
        return True
    if annotation is int:
        return 2 + sum(map(ord, path)) % 1000
    if annotation is float:
        return 0.25 + (sum(map(ord, path)) % 50) / 100
    if annotation is datetime:
        return datetime(2026, 12, 8, 1, 2, 3, 456789, tzinfo=timezone.utc)
    raise TypeError(f"fill() does not know {annotation!r} ({path}): teach it")


def fill_model(model: type[BaseModel], path: str = "") -> dict[str, Any]:
    data = {
        name: fill(f.annotation, f"{path}.{name}" if path else name)
        for name, f in model.model_fields.items()
    }
    if model.model_config.get("extra") == "allow":
        data[EXTRA_KEY] = {"nested": [1, "two"], "at": path or "record"}
    return data


def full_record() -> Record:
    data = fill_model(Record)
    data["schema_version"] = 2
    # A conversation: a user turn, then the answer (roles alternate).
    for key in ("messages", "chosen", "rejected"):
        for msg, role in zip(data[key], ("user", "assistant"), strict=True):
            msg["role"] = role
    return Record.model_validate(data)


def dump(rec: Record) -> dict[str, Any]:
    return rec.model_dump(mode="json")


def every_path(data: Any, prefix: str = "") -> set[str]:
    """The paths of every value set in a dumped record (lists by position)."""
    if isinstance(data, dict):
        out = set()
        for k, v in data.items():
            out |= every_path(v, f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(data, list):
        out = set()
        for i, v in enumerate(data):
            out |= every_path(v, f"{prefix}[{i}]")
        return out
    return {prefix} if data is not None else set()


def test_the_full_record_sets_every_field() -> None:
    data = dump(full_record())
    assert set(data) == set(Record.model_fields) | {EXTRA_KEY}
    assert all(v is not None for v in data.values())
    for msg in data["messages"] + data["chosen"] + data["rejected"]:
        assert set(msg) == set(Message.model_fields)
    assert EXTRA_KEY in data["judge"]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """The full record, and a plain one (no pair, no reasoning: their columns
    are left out only when no record has them)."""
    full = full_record()
    plain = full.model_copy(
        update={
            "id": "plain",
            "index": 99,
            "chosen": None,
            "rejected": None,
            "score_chosen": None,
            "score_rejected": None,
            "judge": None,
            "messages": [Message(role="user", content="q"), Message(role="assistant", content="a")],
        }
    )
    path = tmp_path / "data.jsonl"
    path.write_text(full.model_dump_json() + "\n" + plain.model_dump_json() + "\n")
    return path


def test_hf_export_round_trips_every_field(data_file: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from magpie.commands.publish.columns import record_from_row
    from magpie.commands.publish.folder import export_hf

    export_hf(data_file, tmp_path / "hf")
    ds = datasets.load_dataset(
        str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache")
    )
    originals = [Record.model_validate_json(line) for line in data_file.read_text().splitlines()]
    assert len(ds) == len(originals)
    for row, rec in zip(ds, originals, strict=True):
        back = dump(record_from_row(row))
        # Compared path by path, so that a failure names the field.
        want = dump(rec)
        assert every_path(back) == every_path(want)
        assert back == want


def test_hf_export_leaves_out_only_what_no_record_has(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from magpie.commands.publish.folder import export_hf

    rec = full_record().model_copy(
        update={
            "chosen": None,
            "rejected": None,
            "score_chosen": None,
            "score_rejected": None,
            "messages": [Message(role="user", content="q"), Message(role="assistant", content="a")],
        }
    )
    src = tmp_path / "plain.jsonl"
    src.write_text(rec.model_dump_json() + "\n")
    export_hf(src, tmp_path / "hf")
    ds = datasets.load_dataset(
        str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert not {"chosen", "rejected", "score_chosen", "score_rejected"} & set(ds.column_names)
    assert ds[0]["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    # Everything else is there.
    assert set(Record.model_fields) - {
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
    } <= set(ds.column_names)


def test_sqlite_export_round_trips_every_field(data_file: Path, tmp_path: Path) -> None:
    from magpie.commands.publish.sqlite import export_sqlite

    db_path = tmp_path / "data.db"
    export_sqlite(data_file, db_path)
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    originals = {
        r.id: r for r in map(Record.model_validate_json, data_file.read_text().splitlines())
    }
    rows = {row["id"]: dict(row) for row in db.execute("select * from records")}
    assert rows.keys() == originals.keys()
    for rid, rec in originals.items():
        want = dump(rec)
        row = rows[rid]
        got = {}
        for key, value in want.items():
            assert key in row, f"the records table has no column {key}"
            cell = row[key]
            got[key] = json.loads(cell) if isinstance(value, (dict, list)) else cell
        assert got == want
        assert row["response_score"] == (rec.judge.response_score if rec.judge else None)
        messages = [
            {
                k: v
                for k, v in dict(m).items()
                if k not in ("record_id", "position") and v is not None
            }
            for m in db.execute(
                "select * from messages where record_id = ? order by position", (rid,)
            )
        ]
        assert messages == want["messages"]
        if rec.judge is not None:
            (tags,) = db.execute("select * from judge_tags where record_id = ?", (rid,))
            tags = dict(tags)
            for key, value in want["judge"].items():
                cell = tags[key]
                assert (json.loads(cell) if isinstance(value, (dict, list)) else cell) == value


def test_rejects_keep_every_key_in_hf_and_sqlite(tmp_path: Path) -> None:
    """A pair rejected after its response carries its whole record; an early
    rejection its instruction and context: both reach the exports whole."""
    datasets = pytest.importorskip("datasets")
    from magpie.commands.publish.columns import record_from_row
    from magpie.commands.publish.folder import export_hf
    from magpie.commands.publish.sqlite import export_sqlite

    rec = full_record()
    late = {
        **dump(rec),
        "reject_reason": "low_quality",
        "reject_stage": "judge",
        "reject_detail": "d",
    }
    early = {
        "index": 7,
        "instruction": "Write",
        "model": "m",
        "seed": 3,
        "duplicate_of": "abc",
        "reject_reason": "too_short",
        "reject_stage": "instruction",
        "reject_detail": "",
    }
    data, rejects = tmp_path / "data.jsonl", tmp_path / "rejects.jsonl"
    data.write_text(rec.model_dump_json() + "\n")
    rejects.write_text(json.dumps(late) + "\n" + json.dumps(early) + "\n")

    export_hf(data, tmp_path / "hf", rejects=rejects)
    ds = datasets.load_dataset(
        str(tmp_path / "hf"), "rejects", split="train", cache_dir=str(tmp_path / "cache")
    )
    first, second = ds[0], ds[1]
    assert (first["reason"], first["stage"], first["detail"]) == ("low_quality", "judge", "d")
    assert dump(record_from_row(first)) == dump(rec)
    assert (second["index"], second["instruction"], second["model"], second["seed"]) == (
        7,
        "Write",
        "m",
        3,
    )
    assert json.loads(second["extra_fields"]) == {"duplicate_of": "abc"}
    assert second["reason"] == "too_short"

    export_sqlite(data, tmp_path / "data.db", rejects=rejects)
    db = sqlite3.connect(tmp_path / "data.db")
    db.row_factory = sqlite3.Row
    a, b = (dict(r) for r in db.execute("select * from rejects"))
    for key, value in dump(rec).items():
        assert (json.loads(a[key]) if isinstance(value, (dict, list)) else a[key]) == value, key
    assert (
        a["reason"] == "low_quality" and b["duplicate_of"] == "abc" and b["reason"] == "too_short"
    )


def _generic(path: str) -> str:
    """``messages[1].content`` -> ``messages[].content`` (NO_PLACE's spelling)."""
    return re.sub(r"\[\d+\]", "[]", path)


def _excluded(path: str, no_place: frozenset[str]) -> bool:
    generic = _generic(path)
    return any(generic == n or generic.startswith((f"{n}.", f"{n}[")) for n in no_place)


def test_no_place_names_fields_of_the_record() -> None:
    """Every entry of NO_PLACE is a field of the record (or of its messages),
    and what a format carries is named nowhere in its NO_PLACE."""
    assert set(NO_PLACE) == set(FORMATS) == set(CARRIES)
    for fmt, names in NO_PLACE.items():
        for name in names:
            top, _, sub = name.partition("[].")
            assert top in Record.model_fields, (fmt, name)
            assert not sub or sub in Message.model_fields, (fmt, name)
        assert set(Record.model_fields) == {n.partition("[")[0] for n in names} | CARRIES[fmt]
        assert not names & CARRIES[fmt], fmt


def conversation_records() -> list[Record]:
    """The full record as a conversation (the rejected answer's prompt is the
    chosen one's, as in every record), and the same led by a system message."""
    rec = full_record()
    assert rec.chosen is not None and rec.rejected is not None
    rec = rec.model_copy(update={"rejected": [*rec.chosen[:-1], rec.rejected[-1]]})
    system = Message(role="system", content="<a system message>")
    led = rec.model_copy(
        update={key: [system, *getattr(rec, key)] for key in ("messages", "chosen", "rejected")}
    )
    return [rec, led]


@pytest.mark.parametrize("fmt", FORMATS)
def test_jsonl_formats_carry_every_field_they_have_a_place_for(fmt: str, tmp_path: Path) -> None:
    """Every value of the full record reaches the format (its text is in the
    row), unless NO_PLACE names its field (derived from the record model: a new
    record field is named there by itself, a new message field fails here
    until a format carries it or names it)."""
    for rec in conversation_records():
        src, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
        src.write_text(rec.model_dump_json() + "\n")
        assert export_file(str(src), fmt, str(out), overwrite=True) == 1
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert row == convert(rec, fmt)
        text = json.dumps(row, ensure_ascii=False)
        data = dump(rec)
        carried = 0
        for path in sorted(every_path(data)):
            if path.split(".")[0].split("[")[0] not in Record.model_fields:
                continue  # a key beyond the model: no place in any of these formats
            if _excluded(path, NO_PLACE[fmt]) or path.endswith(".role"):
                continue  # roles are renamed by some formats: checked below
            value = _at(data, path)
            assert json.dumps(value, ensure_ascii=False) in text or (
                isinstance(value, str) and json.dumps(value, ensure_ascii=False)[1:-1] in text
            ), f"{fmt} lost {path}"
            carried += 1
        assert carried, fmt
        roles = [m.role for m in rec.messages]
        if fmt == "openai":
            assert [m["role"] for m in row["messages"]] == roles
        if fmt == "sharegpt":
            assert [m["from"] for m in row["conversations"]] == [
                {"system": "system", "user": "human", "assistant": "gpt"}[r] for r in roles
            ]
        if fmt == "alpaca":
            assert row["instruction"] == rec.messages[-2].content
            assert row["output"] == rec.messages[-1].content
            if roles[0] == "system":
                assert row["system"] == rec.messages[0].content
            else:
                assert "system" not in row
        if fmt == "dpo":
            assert rec.chosen is not None and rec.rejected is not None
            assert row["prompt"] == [m.model_dump() for m in rec.chosen[:-1]]
            assert row["chosen"] == [rec.chosen[-1].model_dump()]
            assert row["rejected"] == [rec.rejected[-1].model_dump()]
            assert (row["score_chosen"], row["score_rejected"]) == (
                rec.score_chosen,
                rec.score_rejected,
            )


def _at(data: Any, path: str) -> Any:
    """The value at ``path`` (as :func:`every_path` spells it) in ``data``."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


def test_every_record_field_has_a_description() -> None:
    """The description is the field's documentation in the dataset card: a
    field added without one fails here."""
    for name, f in Record.model_fields.items():
        assert f.description and f.description.strip(), f"Record.{name} has no description"


def _card_fields(card: str) -> dict[str, tuple[str, str]]:
    """``{name: (type, meaning)}`` of the card's field table."""
    section = card.split("\n## Fields\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            name, kind, doc = (c.strip() for c in line.strip("|").split(" | "))
            rows[name.strip("`")] = (kind, doc)
    return rows


def test_the_card_documents_every_column(data_file: Path, tmp_path: Path) -> None:
    """The card of an hf export names every Parquet column (as ``datasets``
    reads them, in order) with its description; the card of a JSONL file every
    key of its records."""
    datasets = pytest.importorskip("datasets")
    from magpie.commands.publish.folder import card_text, export_hf

    export_hf(data_file, tmp_path / "hf", rejects=None)
    ds = datasets.load_dataset(
        str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache")
    )
    fields = _card_fields((tmp_path / "hf" / "README.md").read_text("utf-8"))
    assert list(fields) == ds.column_names
    for name, f in Record.model_fields.items():
        assert fields[name][1] == f.description, name
    assert "reasoning_content" in fields["messages"][0] and "extra_fields" in fields["judge"][0]

    jsonl_fields = _card_fields(card_text(data_file))
    keys = {k for line in data_file.read_text().splitlines() for k in json.loads(line)}
    assert set(jsonl_fields) == keys - {EXTRA_KEY}
    assert jsonl_fields["turn_generations"][0].startswith("list of object of {temperature")


def test_the_card_needs_no_pyarrow(data_file: Path) -> None:
    """``magpie card`` of a JSONL file works without the hf extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "from magpie.commands.publish.folder import card_text\n"
        f"print(card_text({str(data_file)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(_card_fields(proc.stdout)) == set(Record.model_fields)


def test_a_personas_and_topics_run_keeps_them_in_hf_and_sqlite(tmp_path: Path) -> None:
    """The issue's case through the real command: a ``--personas --topics``
    run exported to hf and sqlite keeps both, record by record."""
    datasets = pytest.importorskip("datasets")
    from magpie_cli import run_magpie
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    out = tmp_path / "data.jsonl"
    (tmp_path / "p.txt").write_text("a beekeeper\na tax lawyer\n")
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine())) as srv:
        proc = run_magpie(
            "generate", "-n", "4", "--model", "llama3.1:8b", "--host", srv.url,
            "--personas", str(tmp_path / "p.txt"), "--topics", "general", "-o", str(out),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(r["persona"] and r["topic"] for r in want.values())
    for fmt, target in (("hf", tmp_path / "hf"), ("sqlite", tmp_path / "data.db")):
        proc = run_magpie("export", str(out), "--format", fmt, "-o", str(target))
        assert proc.returncode == 0, proc.stderr
    ds = datasets.load_dataset(
        str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache")
    )
    db = sqlite3.connect(tmp_path / "data.db")
    rows = {rid: (p, t) for rid, p, t in db.execute("select id, persona, topic from records")}
    for row in ds:
        assert (row["persona"], row["topic"]) == (
            want[row["id"]]["persona"],
            want[row["id"]]["topic"],
        )
        assert rows[row["id"]] == (row["persona"], row["topic"])
    assert len(ds) == len(rows) == 4


def test_the_manifest_records_every_setting() -> None:
    from magpie.commands.generate.topup import NOT_RECORDED, recorded_settings
    from magpie.settings import RunConfig

    config = RunConfig.model_validate({"filters": {"language": "en"}})
    recorded = recorded_settings(config, config.pipeline_settings(3))
    assert set(RunConfig.model_fields) - NOT_RECORDED <= set(recorded)
    assert recorded["filters"]["language"] == "en"
    assert recorded["concurrency"] == 3  # what was resolved, not "auto"
    assert set(RunConfig.model_fields) >= NOT_RECORDED  # no stale name


def test_the_card_shows_every_sampling_setting(data_file: Path) -> None:
    """Each stage's sampling as the manifest records it reaches the card, every
    setting (a field added to Sampling, or recorded by a later magpie, too)."""
    from magpie.backends.base import Sampling
    from magpie.commands.generate.topup import recorded_settings
    from magpie.commands.publish.folder import card_text
    from magpie.settings import RunConfig
    from magpie.store.manifest import Manifest, write_manifest

    stages = {name: fill_model(Sampling, name) for name in ("instruction", "response")}
    config = RunConfig.model_validate(stages)
    settings = recorded_settings(config, config.pipeline_settings(1))
    settings["response"]["a_later_setting"] = 0.5
    write_manifest(
        data_file,
        Manifest(
            output=data_file.name,
            magpie_version="0",
            backend="ollama",
            model="m",
            template=None,
            settings=settings,
            seed=1,
        ),
    )
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in card_text(data_file).splitlines()
        if line.startswith("| ")
    }
    for name in ("instruction", "response"):
        recorded = settings[name]
        assert set(Sampling.model_fields) <= set(recorded)
        for key, value in recorded.items():
            assert f"{key} {value}" in rows[f"{name} sampling"], (name, key)


def test_the_card_falls_back_to_the_language_filter(tmp_path: Path) -> None:
    """No judge languages: the card's ``language`` is the run's --language."""
    from magpie_cli import run_magpie
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    out = tmp_path / "data.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine())) as srv:
        proc = run_magpie(
            "generate", "-n", "2", "--model", "llama3.1:8b", "--host", srv.url,
            "--language", "en", "-o", str(out),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    card = run_magpie("card", str(out))
    assert card.returncode == 0, card.stderr
    header = card.stdout.split("---")[1]
    assert "language:\n- en" in header
    assert "| rule filters |" in card.stdout and "language en" in card.stdout


def test_the_readme_schema_names_every_field() -> None:
    """The README's record schema table is a copy of the model: it must name
    every field (and every message field)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    table = readme.split("## Record schema", 1)[1].split("\n## ", 1)[0]
    for name in Record.model_fields:
        assert f"`{name}`" in table, f"README's record schema lacks {name}"
    for name in Message.model_fields:
        assert f'"{name}"' in table or f"messages[].{name}" in table, name


def _models_in(annotation: Any, seen: dict[type[BaseModel], str], where: str) -> None:
    """Every model inside ``annotation`` (a record field's), with the field
    that holds it."""
    for arg in get_args(annotation):
        _models_in(arg, seen, where)
    if (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and annotation not in seen
    ):
        seen[annotation] = where
        for f in annotation.model_fields.values():
            _models_in(f.annotation, seen, where)


def test_the_readme_schema_names_every_nested_field() -> None:
    """The fields of the models inside a record (generation info, judge tags,
    guard verdicts, messages) are named in the README's row of the field that
    holds them: a field added to one of them fails here until documented."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    table = readme.split("## Record schema", 1)[1].split("\n## ", 1)[0]
    nested: dict[type[BaseModel], str] = {}
    for name, f in Record.model_fields.items():
        _models_in(f.annotation, nested, name)
    assert {StageInfo, JudgeTags, GuardTags, GuardVerdict, Message} <= set(nested)
    for model, holder in nested.items():
        rows = [line for line in table.splitlines() if f"`{holder}" in line]
        assert rows, holder
        text = "\n".join(rows)
        for name in model.model_fields:
            assert any(
                form in text for form in (f"`{name}`", f'"{name}"', f".{name}`", f"`.{name}`")
            ), f"README's row of {holder} lacks {model.__name__}.{name}"
