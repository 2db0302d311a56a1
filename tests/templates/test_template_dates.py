"""Templates that render today's date (Ollama's ``currentDate``, as gpt-oss's
does; a Jinja template's ``strftime_now``): the pre-query differs every day,
the template does not.  A top-up on another day goes on (the nightly cron
job), the record id stays the same, and a pre-query that differs in anything
but the date is still refused.  The Ollama double renders the dated template
(``_debug_render_only``) on the day a test sets; tests/real holds it to the
real server."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from batch_helpers import assert_exact, manifest_of, read_records
from ollama_server import (
    DATED_TEMPLATE,
    RENDER_VERSION,
    OllamaTestServer,
    ScriptedEngine,
    dated_model,
    render_dated,
)
from typer.testing import CliRunner

from magpie.backends.base import ModelInfo
from magpie.cli.app import app
from magpie.commands.merge import merge_files
from magpie.errors import UsageError
from magpie.records import record_id
from magpie.store.manifest import manifest_path
from magpie.templates import resolve_pre_query
from magpie.templates.dates import (
    DATE_MASK,
    ISO_DATE,
    date_formats,
    find_dates,
    same_but_dates,
    same_pre_query,
    undated,
)

TODAY = date.today()
TOMORROW = TODAY + timedelta(days=1)
MODEL = "dated-smollm2:latest"


def _pre_query(day: date, system: str = "You are a helpful AI assistant named SmolLM") -> str:
    return render_dated(
        [{"role": "system", "content": system}, {"role": "user", "content": "X"}], day
    ).split("X")[0]


# ----------------------------------------------------------------- finding the dates


def test_date_formats_of_go_and_jinja_templates() -> None:
    assert date_formats(DATED_TEMPLATE) == [ISO_DATE]
    assert date_formats("{{ .System }} yesterday: {{ yesterdayDate }}") == [ISO_DATE]
    llama32 = '{%- set date_string = strftime_now("%d %b %Y") %}Today Date: {{ date_string }}'
    assert date_formats(llama32) == ["%d %b %Y"]
    # A time of day changes within a day: not a date to mask.
    assert date_formats("{{ strftime_now('%H:%M') }}") == []
    # Templates that write no date: nothing is masked.
    assert date_formats("<|im_start|>{{ .Role }}\n{{ .Content }}") == []
    assert date_formats("{% for m in messages %}{{ m.content }}{% endfor %}") == []
    # A renderer whose template is unknown (Ollama's built-in ones): Ollama's format.
    assert date_formats(None) == [ISO_DATE]


def test_find_dates_finds_the_rendered_day_only() -> None:
    now = datetime(2026, 8, 21, 23, 30, tzinfo=timezone.utc)
    text = "Knowledge cutoff: 2024-06\nCurrent date: 2026-08-22\nReleased 2025-08-05.\n"
    # The server's day may be the next one in its time zone; the release date is no render.
    assert find_dates(text, [ISO_DATE], now) == ["2026-08-22"]
    assert find_dates("Today Date: 21 Aug 2026\n", ["%d %b %Y"], now) == ["21 Aug 2026"]
    assert find_dates("no date here", [ISO_DATE], now) == []
    assert undated(text, ["2026-08-22"]) == text.replace("2026-08-22", DATE_MASK)


def test_same_but_dates() -> None:
    today, yesterday = _pre_query(TODAY), _pre_query(TODAY - timedelta(days=1))
    dates = [TODAY.strftime(ISO_DATE)]
    assert today != yesterday
    assert same_but_dates(yesterday, [], today, dates)
    assert same_but_dates(today, dates, yesterday, [])
    # Anything else that differs is another pre-query.
    other = _pre_query(TODAY - timedelta(days=1), system="You are a chef.")
    assert not same_but_dates(other, [], today, dates)
    # A date written another way is not the same template.
    assert not same_but_dates(
        yesterday.replace((TODAY - timedelta(days=1)).strftime(ISO_DATE), "21 Aug 2026"),
        [],
        today,
        dates,
    )
    # Without dates on either side, exact.
    assert not same_but_dates(yesterday, [], today, [])
    assert same_pre_query({"text": yesterday}, {"text": today, "dates": dates})
    assert not same_pre_query({"text": yesterday}, {"text": today})


def test_jinja_strftime_now_is_found_and_the_id_is_undated() -> None:
    """The embedded backend (and llama-server) render a GGUF's Jinja template:
    Llama 3.2's writes today's date with ``strftime_now``."""
    template = (
        '{{ bos_token }}{%- set date_string = strftime_now("%d %b %Y") %}'
        "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    info = ModelInfo(
        backend="embedded",
        model="m.gguf",
        template=template,
        template_kind="jinja",
        bos_token="<|begin_of_text|>",
        adds_bos=True,
    )
    pq = resolve_pre_query("auto", info)
    today = datetime.now().strftime("%d %b %Y")
    assert pq.dates == [today] and today in pq.text
    assert DATE_MASK in pq.undated and today not in pq.undated
    other_day = pq.model_copy(update={"text": pq.text.replace(today, "01 Jan 2020")})
    assert same_but_dates(other_day.text, [], pq.text, pq.dates)


# ----------------------------------------------------------------- runs on the double


def _server() -> OllamaTestServer:
    return OllamaTestServer([dated_model(ScriptedEngine())], version=RENDER_VERSION)


def _generate(srv: OllamaTestServer, out: Path, n: int, *extra: str):  # type: ignore[no-untyped-def]
    args = ["generate", "-n", str(n), "--model", MODEL, "--host", srv.url, "-o", str(out)]
    return CliRunner().invoke(app, [*args, "--backoff-base", "0.05", *extra])


def test_the_double_renders_the_date_of_its_day(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with _server() as srv:
        srv.today = TOMORROW
        res = _generate(srv, out, 1, "--seed", "3")
    assert res.exit_code == 0, res.output
    template = manifest_of(out).template or {}
    assert template["source"] == "ollama-render"
    assert f"Current date: {TOMORROW:%Y-%m-%d}<|im_end|>" in template["text"]
    assert template["dates"] == [f"{TOMORROW:%Y-%m-%d}"]


def test_top_up_the_next_day_goes_on(tmp_path: Path) -> None:
    """The nightly cron job: day 1 writes 3 records, day 2 tops the file up to 5."""
    out = tmp_path / "d.jsonl"
    with _server() as srv:
        srv.today = TODAY
        first = _generate(srv, out, 3, "--seed", "5")
        assert first.exit_code == 0, first.output
        srv.today = TOMORROW
        second = _generate(srv, out, 5)
    assert second.exit_code == 0, second.output
    assert "holds 3 records; generating 2 more" in second.stderr
    recs = assert_exact(out, 5)
    assert {r.seed for r in recs} == {5}
    m = manifest_of(out)
    assert [r.written for r in m.runs] == [3, 2]
    # Each run says the day its pre-query was rendered; the template is the last run's.
    assert [r.template_dates for r in m.runs] == [[f"{TODAY:%Y-%m-%d}"], [f"{TOMORROW:%Y-%m-%d}"]]
    assert f"{TOMORROW:%Y-%m-%d}" in (m.template or {})["text"]


def test_top_up_with_another_pre_query_is_still_refused(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with _server() as srv:
        srv.today = TODAY
        assert _generate(srv, out, 2, "--seed", "5").exit_code == 0
        before = out.read_bytes()
        srv.today = TOMORROW
        res = _generate(srv, out, 4, "--system", "You are a chef.")
    assert res.exit_code == 2, res.output
    assert "a different pre-query text" in res.stderr and "--allow-mixed" in res.stderr
    assert out.read_bytes() == before


def test_record_ids_are_the_same_on_every_day(tmp_path: Path) -> None:
    """Same model, template, seed and index: the same id, whatever the day
    (the id hashes the pre-query with its date masked)."""
    ids = {}
    with _server() as srv:
        for day in (TODAY, TOMORROW):
            srv.today = day
            out = tmp_path / f"{day}.jsonl"
            assert _generate(srv, out, 3, "--seed", "8").exit_code == 0
            ids[day] = [r.id for r in assert_exact(out, 3)]
            text = (manifest_of(out).template or {})["text"]
            assert ids[day][0] == record_id(MODEL, undated(text, [f"{day:%Y-%m-%d}"]), 8, 0)
    assert ids[TODAY] == ids[TOMORROW]


def test_a_manifest_written_before_dates_were_recorded_tops_up(tmp_path: Path) -> None:
    """A manifest of an older magpie has the text with its day's date and no
    ``dates``: the same template, compared by the dates found today."""
    out = tmp_path / "d.jsonl"
    with _server() as srv:
        srv.today = TODAY - timedelta(days=1)
        assert _generate(srv, out, 2, "--seed", "4").exit_code == 0
        mpath = manifest_path(out)
        data = json.loads(mpath.read_text())
        del data["template"]["dates"]
        for run in data["runs"]:
            del run["template_dates"]
        mpath.write_text(json.dumps(data))
        srv.today = TODAY
        res = _generate(srv, out, 3)
    assert res.exit_code == 0, res.output
    assert_exact(out, 3)


def test_merge_of_two_days_keeps_one_template(tmp_path: Path) -> None:
    """Shards made on different days are one template to ``merge``."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with _server() as srv:
        srv.today = TODAY
        assert _generate(srv, a, 2, "--seed", "6", "--shard", "0/2").exit_code == 0
        srv.today = TOMORROW
        assert _generate(srv, b, 2, "--seed", "6", "--shard", "1/2").exit_code == 0
    out = tmp_path / "all.jsonl"
    merge_files([a, b], out)
    m = manifest_of(out)
    assert (m.template or {}).get("text") == (manifest_of(a).template or {})["text"]
    assert [r.template_dates for r in m.runs] == [[f"{TODAY:%Y-%m-%d}"], [f"{TOMORROW:%Y-%m-%d}"]]
    recs = read_records(out)
    assert len(recs) == len({r.id for r in recs}) == 4


def test_merge_refuses_another_pre_query_on_another_day(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with _server() as srv:
        srv.today = TODAY
        assert _generate(srv, a, 1, "--seed", "6").exit_code == 0
        srv.today = TOMORROW
        assert _generate(srv, b, 1, "--seed", "7", "--system", "You are a chef.").exit_code == 0
    with pytest.raises(UsageError, match="a different pre-query text"):
        merge_files([a, b], tmp_path / "all.jsonl")
