"""Template registry, BOS handling, auto-detection and Jinja derivation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magpie.backends.base import ModelInfo
from magpie.backends.ollama import system_from_modelfile
from magpie.errors import TemplateError, UsageError
from magpie.templates import (
    detect_family,
    drop_bos,
    families,
    get_family,
    load_family_file,
    resolve_pre_query,
)
from magpie.templates.jinja import derive_stop, split_at_sentinel

FIXTURES = Path(__file__).resolve().parents[1] / "support" / "fixtures" / "ollama"

# The reference values of ../shared/reference/magpie-method.md, verbatim.
REFERENCE = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    ),
    "chatml": ("<|im_start|>user\n", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen2.5": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n",
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    ),
    "gemma": ("<bos><start_of_turn>user\n\n", ["<eos>", "<bos>", "<end_of_turn>"]),
    "phi3": (
        "<s> <|user|>\n",
        [
            "</s>",
            "<s>",
            "<unk>",
            "<|endoftext|>",
            "<|user|>",
            "<|assistant|>",
            "<|system|>",
            "<|end|>",
        ],
    ),
    "mistral": ("<s> [INST] ", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions."
        "\n\nUSER: ",
        ["ASSISTANT"],
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_registry_matches_reference(name: str) -> None:
    pre_query, stop = REFERENCE[name]
    fam = get_family(name)
    assert fam.pre_query == pre_query
    assert fam.stop == stop


def test_llama3_system_form_matches_reference() -> None:
    fam = get_family("llama3")
    assert fam.render("SYS") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert fam.user_header == "<|start_header_id|>user<|end_header_id|>\n\n"


def test_smollm2_family_has_its_default_system_block() -> None:
    assert get_family("smollm2").pre_query == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\n"
    )


def test_required_families_and_aliases() -> None:
    names = set(families())
    assert {"llama3", "chatml", "qwen2.5", "gemma", "phi3", "mistral", "llama2", "vicuna"} <= names
    assert get_family("llama3.1").name == "llama3"
    assert get_family("Qwen2").name == "chatml"
    assert get_family("gemma3").name == "gemma"


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(TemplateError) as exc:
        get_family("nope")
    for name in ("llama3", "chatml", "gemma", "phi3", "mistral", "vicuna"):
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
            "<|start_header_id|>user<|end_header_id|>\n\n",
        ),
        ("<bos><start_of_turn>user\n\n", "<start_of_turn>user\n\n"),
        ("<s> [INST] ", "[INST] "),
        ("<s> <|user|>\n", "<|user|>\n"),
        ("<|im_start|>user\n", "<|im_start|>user\n"),
        ("USER: ", "USER: "),
    ],
)
def test_drop_bos(text: str, expected: str) -> None:
    assert drop_bos(text) == expected


def _ollama_info(fixture: dict) -> ModelInfo:
    show = fixture["show"]
    return ModelInfo(
        backend="ollama",
        model=fixture["name"],
        template=show["template"],
        template_kind="go",
        system=system_from_modelfile(show["modelfile"]),
        family=show["details"]["family"],
        adds_bos=True,
    )


FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_auto_detection_from_ollama_show(path: Path) -> None:
    fixture = json.loads(path.read_text())
    info = _ollama_info(fixture)
    # The client drops `system` from ShowResponse; magpie reads the modelfile.
    assert info.system == fixture["show"].get("system")
    expected = fixture["expected_family"]
    if expected is None:
        with pytest.raises(TemplateError) as exc:
            resolve_pre_query("auto", info)
        assert "llama3" in str(exc.value) and "--template" in str(exc.value)
        return
    pq = resolve_pre_query("auto", info)
    assert pq.name == expected
    assert pq.source == "ollama-auto"
    fam = get_family(expected)
    # Through Ollama the BOS string is never sent: its tokenizer adds BOS itself.
    for bos in ("<|begin_of_text|>", "<bos>", "<s>"):
        assert not pq.text.startswith(bos)
    assert pq.text == drop_bos(fam.render(info.system if fam.system_pre_query else None), fam.bos)
    assert pq.stop == fam.stop


def test_detection_cases_cover_the_required_families() -> None:
    expected = {json.loads(p.read_text())["expected_family"] for p in FIXTURE_FILES}
    assert {"llama3", "chatml", "gemma", "phi3", "mistral"} <= expected


def test_ollama_smollm2_renders_its_system_block() -> None:
    info = _ollama_info(json.loads((FIXTURES / "smollm2.json").read_text()))
    pq = resolve_pre_query("auto", info)
    assert pq.text == get_family("smollm2").pre_query
    assert pq.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_user_system_overrides_ollama_default() -> None:
    info = _ollama_info(json.loads((FIXTURES / "llama3.json").read_text()))
    pq = resolve_pre_query("auto", info, system="You are a math tutor.")
    assert pq.text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a math tutor.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )


def test_named_template_keeps_bos_when_backend_does_not_add_it() -> None:
    info = ModelInfo(backend="embedded", model="m.gguf", adds_bos=False)
    assert resolve_pre_query("llama3", info).text.startswith("<|begin_of_text|>")
    info_bos = ModelInfo(backend="ollama", model="m", adds_bos=True)
    assert resolve_pre_query("llama3", info_bos).text.startswith("<|start_header_id|>")


def test_detect_family_on_unknown_text() -> None:
    assert detect_family("{{ .Prompt }}") is None


SMOLLM2_PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\n"
)


def test_jinja_pre_query_of_embedded_smollm2(smollm2_info: ModelInfo) -> None:
    """The GGUF's own chat template, rendered around a sentinel, gives exactly
    the default-system pre-query."""
    pq = resolve_pre_query("auto", smollm2_info)
    assert pq.source == "gguf-jinja"
    assert pq.text == SMOLLM2_PRE_QUERY
    assert "<|im_end|>" in pq.stop and "<|im_start|>" in pq.stop
    with_system = resolve_pre_query("auto", smollm2_info, system="Be brief.")
    assert with_system.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


# Llama 3.1's Hugging Face template, abridged to its message loop: BOS first,
# then a header per message.
LLAMA3_JINJA = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_jinja_derivation_for_unknown_gguf_with_bos() -> None:
    info = ModelInfo(
        backend="embedded",
        model="x.gguf",
        template=LLAMA3_JINJA,
        template_kind="jinja",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        adds_bos=True,
    )
    pq = resolve_pre_query("auto", info)
    # The tokenizer adds BOS, so the rendered BOS string is dropped.
    assert pq.text == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert pq.name == "gguf-jinja:llama3"
    assert set(get_family("llama3").stop) <= set(pq.stop)
    info.adds_bos = False
    assert (
        resolve_pre_query("auto", info).text
        == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    )


def test_jinja_split_and_stops_for_plain_text_template() -> None:
    tmpl = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    prefix, suffix = split_at_sentinel(tmpl)
    assert prefix == "USER: "
    assert derive_stop(prefix, suffix) == ["ASSISTANT:"]


def test_jinja_template_that_raises() -> None:
    tmpl = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(TemplateError, match="refused to render"):
        split_at_sentinel(tmpl)


def test_template_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('pre_query = "<|user|>\\n"\nstop = ["<|end|>"]\nbos = ""\n')
    info = ModelInfo(backend="ollama", model="m")
    pq = resolve_pre_query(str(f), info)
    assert pq.text == "<|user|>\n" and pq.stop == ["<|end|>"] and pq.source == "file"
    assert pq.name == "mine"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("pre_query = ", "not valid TOML"),
        ('pre_query = "x"\n', "stop"),
        ('pre_query = "x"\nstop = []\nbogus = 1\n', "bogus"),
        ('pre_query = ""\nstop = []\n', "pre_query"),  # an empty pre-query asks nothing
    ],
)
def test_bad_template_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_family_file(f)


def test_missing_template_file() -> None:
    with pytest.raises(UsageError, match="not found"):
        resolve_pre_query("/nonexistent/t.toml", ModelInfo(backend="ollama", model="m"))


def test_family_without_system_slot(tmp_path: Path) -> None:
    f = tmp_path / "nosys.toml"
    f.write_text('pre_query = "Q: "\nstop = ["A:"]\n')
    with pytest.raises(TemplateError, match="no system slot"):
        resolve_pre_query(str(f), ModelInfo(backend="ollama", model="m"), system="hi")


def test_phi3_detected_from_ollamas_role_slot_template() -> None:
    from magpie.templates.resolve import detect_family

    stock = (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
        "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ if $last }}<|assistant|>\n{{ end }}{{ end }}"
    )
    fam = detect_family(stock)
    assert fam is not None and fam.name == "phi3"
