"""The checks of a run that need no backend (exit 2), before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from magpie.errors import UsageError
from magpie.pipeline.stages.filters import build_filters
from magpie.pipeline.steering import Steering
from magpie.settings import BACKENDS, RunConfig
from magpie.store.jsonl import check_run_targets, run_targets
from magpie.store.targets import Targets


@dataclass
class Checked:
    """What the checks found and a run goes on with (each read once)."""

    #: The output file (None: stdout).
    path: Path | None
    #: The persona and topic lists, loaded (None: neither asked for).
    steering: Steering | None
    #: ``--system``, or the text of ``--system-preset``.
    system: str | None
    #: The output and ``--rejects``, checked; a run claims them (their locks).
    targets: Targets


def check_run(config: RunConfig, steering: Steering | None | Literal["load"] = "load") -> Checked:
    """Every check that needs no backend (exit 2).  ``steering``: the lists a
    caller has already loaded (``Prepared.steering``); by default they are
    loaded here (a missing or empty ``--personas`` / ``--topics`` file fails)."""
    from magpie.backends.llamacpp.model import check_gguf
    from magpie.backends.registry import looks_like_gguf
    from magpie.templates import get_family, load_family_file

    traits = BACKENDS[config.backend]
    config.check_hosts()  # by the rules of the backend that uses each
    if config.model and traits.loads_gguf and looks_like_gguf(config.model):
        check_gguf(config.model)
    config.shard_spec  # noqa: B018 - validates --shard
    system = config.effective_system  # validates --system-preset
    if config.responses > 1 and config.turns > 1:
        raise UsageError("--responses K samples the first answer: use it with --turns 1")
    if config.samples_per_request > 1 and not traits.takes_n:
        # Only OpenAI-compatible servers take `n`; refuse before a model loads.
        raise UsageError(
            f"--samples-per-request {config.samples_per_request} needs --backend openai "
            "(a server that honours `n`, e.g. vLLM); the Ollama and embedded backends "
            "take one sample per request"
        )
    if config.num_ctx is not None and not traits.sets_context:
        raise UsageError(
            f"--num-ctx {config.num_ctx}: an OpenAI-compatible server fixes its context when "
            "it starts (llama-server -c N, vllm serve --max-model-len N); drop --num-ctx"
        )
    if config.system_preset is not None and config.system is not None:
        raise UsageError("pass --system or --system-preset, not both")
    config.validate_semantic()
    if config.systems and (config.system is not None or config.system_preset is not None):
        raise UsageError("a weighted [systems] set replaces --system / --system-preset")
    for spec in (config.systems or {}).values():
        spec.text()
    if steering == "load":
        steering = config.steering()
    config.check_prompt_texts()  # every user text that reaches a prompt
    if steering is not None:
        steering.check_items()
    spec = config.template.strip()
    if spec.lower() != "auto":
        fam = (
            load_family_file(spec)
            if spec.endswith((".toml", ".tml")) or "/" in spec or Path(spec).is_file()
            else get_family(spec)
        )
        if system is not None or config.systems or steering is not None:
            fam.render(system or "x")  # a family without a system slot refuses here
    build_filters(config.filters)  # an unknown --language fails here, before a model loads
    if config.balance and config.judge is None:
        raise UsageError("--balance balances the judge's task categories: it needs --judge")
    if config.judge is None and config.judge_backend != "auto":
        raise UsageError(
            f"--judge-backend {config.judge_backend} needs --judge MODEL (or --judge same)"
        )
    targets = run_targets(config.output, config.rejects, overwrite=config.overwrite)
    check_run_targets(targets)
    return Checked(targets["output"].path, steering, system, targets)


def validate_config(config: RunConfig) -> Path | None:
    """Every check that needs no backend (exit 2); the output file (None: stdout)."""
    return check_run(config).path
