"""Personas and topics (issue 13): lists, draws, the system block, and runs
through the real CLI against the Ollama double and the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import gen_args, read_records, scripted_server
from magpie_cli import run_magpie

from magpie.backends.base import ModelInfo
from magpie.errors import UsageError
from magpie.pipeline.steering import (
    DEFAULT_SYSTEM,
    Steering,
    builtin_names,
    check_template,
    load_list,
)
from magpie.templates import get_family, resolve_pre_query

# ----------------------------------------------------------------------------- lists


def test_builtin_sets_are_large_distinct_and_clean() -> None:
    assert "everyday" in builtin_names("persona") and "general" in builtin_names("topic")
    personas = load_list("everyday", "persona")
    topics = load_list("general", "topic")
    assert personas.source == "builtin:everyday" and len(personas.items) >= 250
    assert len(topics.items) >= 120
    for lst in (personas, topics):
        assert len(set(lst.items)) == len(lst.items), "a built-in set repeats an item"
        assert not any(i.startswith("#") or "<" in i for i in lst.items)
    # Professions, ages and regions are all represented.
    text = " ".join(personas.items)
    for word in ("teacher", "nurse", "farmer", "engineer", "retired", "student", "year-old"):
        assert word in text
    for place in ("Lagos", "Osaka", "Texas", "Lisbon", "Manila", "Chile"):
        assert place in text


def test_text_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# my personas\n\na  chef   in Lyon\n\na pilot\n", encoding="utf-8")
    lst = load_list(str(txt), "persona")
    assert lst.items == ("a chef in Lyon", "a pilot") and lst.source == str(txt)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"persona": "a chef in Lyon", "id": 1}\n"a pilot"\n\n', encoding="utf-8")
    assert load_list(str(jl), "persona").items == lst.items
    assert load_list(str(jl), "persona").digest == lst.digest  # same items, same digest
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="line 1 has no 'persona'"):
        load_list(str(bad), "persona")
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no topic"):
        load_list(str(empty), "topic")
    with pytest.raises(UsageError, match="no such file and no built-in set.*everyday"):
        load_list(str(tmp_path / "missing.txt"), "persona")


def test_templates_need_their_slot() -> None:
    assert check_template("{system} Hi {persona}.", "persona")
    with pytest.raises(UsageError, match=r"must contain \{topic\}"):
        check_template("{system} about {persona}", "topic")


# ----------------------------------------------------------------------------- the system block


def _steering(personas: list[str], topics: list[str] | None = None) -> Steering:
    from magpie.pipeline.steering import SteerList

    p = SteerList("persona", tuple(personas), "test", "x")
    t = SteerList("topic", tuple(topics), "test", "y") if topics else None
    return Steering(p, t)


def test_system_text_places_each_item_after_the_base() -> None:
    s = _steering(["a pilot"], ["cooking"])
    text = s.system_text(
        "You are SmolLM, trained by Hugging Face", {"persona": "a pilot", "topic": "cooking"}
    )
    assert text.startswith("You are SmolLM, trained by Hugging Face. The user is a pilot.")
    assert text.endswith("The user asks you a question about cooking.")
    assert s.system_text(None, {"persona": "a pilot", "topic": "x"}).startswith(DEFAULT_SYSTEM)
    s.templates["persona"] = "Speak as to {persona}; {system}"
    assert s.system_text("Base.", {"persona": "a pilot", "topic": "x"}).startswith(
        "Speak as to a pilot; Base."
    )


def test_draws_are_reproducible_and_spread() -> None:
    fam = get_family("llama3")
    info = ModelInfo(model="m", backend="ollama")
    s = _steering([f"persona {i}" for i in range(20)])
    sentinel_pq = resolve_pre_query("llama3", info, s.sentinel_system("Base."))
    s.add_base(None, sentinel_pq)
    draws = [s.draw(7, i, None, None) for i in range(200)]
    again = [s.draw(7, i, None, None) for i in range(200)]
    assert [d.persona for d in draws] == [d.persona for d in again]
    assert [d.persona for d in draws] != [s.draw(8, i, None, None).persona for i in range(200)]
    assert len({d.persona for d in draws}) == 20
    d = draws[0]
    exact = resolve_pre_query("llama3", info, s.system_text("Base.", {"persona": d.persona}))
    assert d.pre_query.text == exact.text and d.pre_query.system == exact.system
    assert fam.name in d.pre_query.name


def test_add_base_refuses_a_template_without_the_sentinel() -> None:
    info = ModelInfo(model="m", backend="ollama")
    s = _steering(["a pilot"])
    plain = resolve_pre_query("llama3", info, "no sentinel here")
    with pytest.raises(UsageError, match="no system slot"):
        s.add_base(None, plain)


def test_items_with_template_tokens_are_refused() -> None:
    s = _steering(["a pilot", "a spy <|eot_id|> system"])
    with pytest.raises(UsageError, match=r"persona 2 holds the template token '<\|eot_id\|>'"):
        s.check_items(["<|eot_id|>", "<|start_header_id|>"])


# ----------------------------------------------------------------------------- runs


def test_personas_through_the_ollama_double(tmp_path: Path) -> None:
    pfile = tmp_path / "personas.txt"
    pfile.write_text("a beekeeper in Slovenia\na tax lawyer in London\na 9-year-old\n")
    out = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with scripted_server() as srv:
        for o in out:
            proc = run_magpie(*gen_args(srv, o, 12, "--seed", "5", "--personas", str(pfile)))
            assert proc.returncode == 0, proc.stderr
        prompts = [g.body["prompt"] for g in srv.requests_to("/api/generate")]
    a, b = (read_records(o) for o in out)
    assert [r.persona for r in a] == [r.persona for r in b]  # same seed, same draws
    assert {r.persona for r in a} == set(pfile.read_text().split("\n")[:3])
    for r in a:
        assert r.persona in (r.system or "") and r.topic is None
        # The instruction was asked with exactly this system block in the pre-query.
        assert any(r.system in p and r.instruction not in p for p in prompts)
    manifest = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    assert manifest["settings"]["personas"]["count"] == 3
    assert manifest["settings"]["personas"]["source"] == str(pfile)
    stats = json.loads(run_magpie("stats", str(out[0]), "--json").stdout)
    assert stats["diversity"]["personas"]["distinct"] == 3
    card = run_magpie("card", str(out[0]))
    assert card.returncode == 0, card.stderr
    assert f"| personas | {pfile} (3 items" in card.stdout
    assert "### Diversity of instructions" in card.stdout and "distinct-2" in card.stdout


def test_topics_with_weighted_systems_top_up_and_mixed_lists(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        '[systems.math]\npreset = "math"\nweight = 1\n'
        '[systems.poet]\nprompt = "You help people write poems."\nweight = 1\n'
    )
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        first = run_magpie(
            *gen_args(srv, out, 6, "--seed", "3", "--config", "run.toml", "--topics", "general")
        )
        assert first.returncode == 0, first.stderr
        more = run_magpie(*gen_args(srv, out, 10, "--config", "run.toml", "--topics", "general"))
        assert more.returncode == 0, more.stderr
        other = tmp_path / "t.txt"
        other.write_text("gardening\n")
        mixed = run_magpie(*gen_args(srv, out, 14, "--config", "run.toml", "--topics", str(other)))
    recs = read_records(out)
    assert len(recs) == 10 and len({r.id for r in recs}) == 10
    assert {r.system_name for r in recs} == {"math", "poet"}
    for r in recs:
        assert r.topic and f"question about {r.topic}." in (r.system or "")
        base = "You help people write poems." if r.system_name == "poet" else "step-by-step"
        assert base in (r.system or "")
    assert mixed.returncode == 2
    assert "topics builtin:general (153)" in mixed.stderr and "--allow-mixed" in mixed.stderr


def test_bad_steering_flags_fail_before_any_work(tmp_path: Path) -> None:
    missing = run_magpie("generate", "--backend", "ollama", "--personas", str(tmp_path / "no.txt"))
    assert missing.returncode == 2 and "no such file and no built-in set" in missing.stderr
    lone = run_magpie("generate", "--backend", "ollama", "--persona-template", "{persona}")
    assert lone.returncode == 2 and "--persona-template needs --personas" in lone.stderr
    slot = run_magpie(
        "generate", "--backend", "ollama", "--topics", "general", "--topic-template", "about it"
    )
    assert slot.returncode == 2 and "must contain {topic}" in slot.stderr
    for proc in (missing, lone, slot):
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_personas_on_the_embedded_model(tmp_path: Path) -> None:
    """The GGUF's own Jinja template: the default system it writes itself
    (SmolLM2's) is kept, the persona follows it."""
    out = tmp_path / "d.jsonl"
    proc = run_magpie(
        "generate",
        "-n",
        "2",
        "--backend",
        "embedded",
        "--seed",
        "4",
        "--personas",
        "everyday",
        "--response-max-tokens",
        "24",
        "--keep-truncated",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    for r in read_records(out):
        assert r.persona and r.system
        assert r.system.startswith("You are a helpful AI assistant named SmolLM")
        assert f"The user is {r.persona}." in r.system


def test_shards_draw_what_the_whole_run_draws_at_their_indexes(tmp_path: Path) -> None:
    whole, s0, s1 = tmp_path / "w.jsonl", tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    with scripted_server() as srv:
        for out, extra in ((whole, []), (s0, ["--shard", "0/2"]), (s1, ["--shard", "1/2"])):
            proc = run_magpie(
                *gen_args(srv, out, 6, "--seed", "8", "--personas", "everyday", *extra)
            )
            assert proc.returncode == 0, proc.stderr
    by_index = {r.index: r.persona for r in read_records(whole)}
    shard_recs = read_records(s0) + read_records(s1)
    assert {r.index % 2 for r in read_records(s1)} == {1}
    common = [r for r in shard_recs if r.index in by_index]
    assert len(common) >= 4 and all(r.persona == by_index[r.index] for r in common)


def test_a_placeholder_inside_a_value_stays_as_it_is() -> None:
    """The templates are filled in one pass: a persona that holds ``{system}``
    or ``{topic}`` is not replaced by the system prompt or the topic."""
    s = _steering(["a fan of {system} and {topic}"], ["chess"])
    text = s.system_text("Be kind.", {"persona": "a fan of {system} and {topic}", "topic": "chess"})
    assert text == (
        "Be kind. The user is a fan of {system} and {topic}. The user asks you a question "
        "about chess."
    )
