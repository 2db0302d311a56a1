"""``magpie export --format hf`` and ``magpie card`` (issue 14): the folder loads
with the real ``datasets``, the card parses with the real ``huggingface_hub``,
and the card's numbers are those of ``magpie stats``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import MODEL, preference_engine
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, build_models

datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")


def load(folder: Path, tmp_path: Path, config: str | None = None):  # type: ignore[no-untyped-def]
    """``load_dataset(folder)`` with a cache of its own: with ``configs`` in the
    card, ``datasets`` 5.2 caches a local folder by its name and config alone, so
    two folders named ``hf`` share one cache entry."""
    return datasets.load_dataset(
        str(folder), config, split="train", cache_dir=str(tmp_path / "cache")
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A judged ``--responses 3`` run with thresholds: records, pairs and rejects."""
    d = tmp_path_factory.mktemp("publish")
    data, rejects = d / "data.jsonl", d / "data.rejects.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], preference_engine())) as srv:
        proc = run_magpie(
            "generate", "-n", "6", "--model", MODEL, "--host", srv.url, "--seed", "3",
            "--responses", "3", "--judge", "same", "--min-response-score", "9",
            "--rejects", str(rejects), "-o", str(data),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert rejects.read_text().strip(), "the run should reject something"
    return data, rejects


def _stats(data: Path, rejects: Path) -> dict:  # type: ignore[type-arg]
    proc = run_magpie("stats", str(data), "--rejects", str(rejects), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_hf_folder_loads_and_its_card_validates(run: tuple[Path, Path], tmp_path: Path) -> None:
    data, rejects = run
    out = tmp_path / "hf"
    proc = run_magpie(
        "export", str(data), "--format", "hf", "-o", str(out), "--rejects", str(rejects),
        "--language", "en",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hf upload REPO" in proc.stderr and proc.stdout == ""
    stats = _stats(data, rejects)
    records = [json.loads(line) for line in data.read_text().splitlines()]

    ds = load(out, tmp_path)
    assert len(ds) == stats["kept"] == len(records)
    assert ds["id"] == [r["id"] for r in records]
    assert ds[0]["messages"] == records[0]["messages"] and ds[0]["chosen"] == records[0]["chosen"]
    assert ds[0]["judge"]["response_score"] == records[0]["judge"]["response_score"]
    rej = load(out, tmp_path, "rejects")
    assert len(rej) == len(rejects.read_text().splitlines()) == stats["rejected_total"]
    assert set(rej["reason"]) == set(stats["rejected"])

    card = huggingface_hub.DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "unknown" and meta["language"] == ["en"]
    assert meta["size_categories"] == ["n<1K"] and meta["task_categories"] == ["text-generation"]
    assert {"synthetic", "magpie", "dpo"} <= set(meta["tags"])
    assert [c["config_name"] for c in meta["configs"]] == ["default", "rejects"]
    huggingface_hub.DatasetCardData(**meta)  # the Hub's own model of the metadata takes it
    configs = datasets.utils.metadata.MetadataConfigs.from_dataset_card_data(card.data)
    assert configs["rejects"]["data_files"] == [
        {"split": "train", "path": "rejects/train-*.parquet"}
    ]

    body = card.text
    assert f"| records | {stats['kept']:,} |" in body
    assert f"| rejected attempts | {stats['rejected_total']:,} |" in body
    for reason, n in stats["rejected"].items():
        assert f"| {reason} | {n:,} |" in body
    words = stats["response_length"]["words"]
    assert f"| response (words) | {words['min']} | {words['p50']} | {words['p90']} |" in body
    for level, n in stats["judge"]["response_scores"].items():
        assert f"| {level} | {n:,} |" in body
    manifest = json.loads((data.parent / (data.name + ".manifest.json")).read_text())
    assert f"`{MODEL}`" in body and manifest["template"]["text"] in body
    assert "min_response_score 9" in body and "`same`" in body
    assert "license is not set" in body and "generator model" in body
    assert "xu2024magpie" in body and "Known limitations" in body
    for image in ("images/response_words.svg", "images/rejected.svg"):
        assert f"]({image})" in body and (out / image).read_text().startswith("<svg xmlns=")


def test_card_alone_matches_the_folder_card(run: tuple[Path, Path], tmp_path: Path) -> None:
    data, rejects = run
    proc = run_magpie("card", str(data), "--rejects", str(rejects), "--license", "apache-2.0")
    assert proc.returncode == 0, proc.stderr
    card = huggingface_hub.DatasetCard(proc.stdout)
    assert card.data.license == "apache-2.0" and "configs" not in card.data.to_dict()
    assert "Released under `apache-2.0`" in card.text
    assert f"| records | {_stats(data, rejects)['kept']:,} |" in card.text


def test_shards_and_overwrite_and_atomicity(run: tuple[Path, Path], tmp_path: Path) -> None:
    from magpie.commands.publish.folder import export_hf
    from magpie.errors import UsageError

    data, _ = run
    out = tmp_path / "hf"
    res = export_hf(data, out, shard_records=2)
    n = len(data.read_text().splitlines())
    assert res.shards == -(-n // 2) and res.records == n
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names[0] == f"train-00000-of-{res.shards:05d}.parquet"
    assert len(load(out, tmp_path)) == n
    # An existing folder needs --overwrite, and is left alone without it.
    before = (out / "README.md").read_text()
    proc = run_magpie("export", str(data), "--format", "hf", "-o", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "README.md").read_text() == before
    proc = run_magpie("export", str(data), "--format", "hf", "-o", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "data").iterdir())) == 1
    # A bad line halfway: no folder, no temporary left behind.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"not": "a record"}\n')
    with pytest.raises(UsageError):
        export_hf(bad, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "cache", "hf"]


def test_plain_records_have_no_preference_columns(tmp_path: Path) -> None:
    from magpie.commands.publish.folder import export_hf

    data = tmp_path / "plain.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], preference_engine())) as srv:
        proc = run_magpie(
            "generate", "-n", "3", "--model", MODEL, "--host", srv.url, "-o", str(data)
        )
    assert proc.returncode == 0, proc.stderr
    export_hf(data, tmp_path / "hf")
    ds = load(tmp_path / "hf", tmp_path)
    assert "messages" in ds.column_names
    assert not {"chosen", "rejected", "prompt", "completion"} & set(ds.column_names)
