"""The settings model: :class:`RunConfig`, every setting of ``magpie generate``,
and the sections derived from it (the backends' :class:`BackendSpec`, the
pipeline's :class:`PipelineSettings`, the retry policy, the judge's thresholds)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from magpie.backends.base import Sampling
from magpie.backends.retry import RetryPolicy
from magpie.backends.spec import BackendName, BackendSpec
from magpie.errors import UsageError
from magpie.pipeline.scheduler import (
    PipelineSettings,
    default_instruction_sampling,
    default_response_sampling,
)
from magpie.pipeline.stages.dedup.index import DEFAULT_SEMANTIC_THRESHOLD
from magpie.pipeline.stages.filters import FilterSettings
from magpie.pipeline.stages.judge import (
    Category,
    Difficulty,
    Quality,
    Thresholds,
    parse_categories,
    read_prompt_file,
)
from magpie.pipeline.stages.reasoning import ReasoningMode
from magpie.pipeline.steering import (
    DEFAULT_TEMPLATES,
    Steering,
    SteerList,
    check_template,
    load_list,
)
from magpie.settings.traits import BACKENDS, DEFAULT_EMBEDDER
from magpie.templates.injection import check_prompt_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SystemSpec(BaseModel):
    """One entry of a weighted set of system prompts."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    preset: str | None = None
    weight: float = Field(1.0, gt=0)

    def text(self) -> str:
        if (self.prompt is None) == (self.preset is None):
            raise UsageError("a [systems] entry needs exactly one of prompt or preset")
        return self.prompt if self.prompt is not None else preset_prompt(self.preset or "")


def presets() -> dict[str, str]:
    from importlib import resources

    return tomllib.loads(
        resources.files("magpie.prompts").joinpath("presets.toml").read_text("utf-8")
    )


def preset_prompt(name: str) -> str:
    table = presets()
    if name not in table:
        raise UsageError(f"unknown system preset {name!r}; known: {', '.join(table)}")
    return table[name]


#: The settings whose text reaches a prompt: each passes the one check of a
#: user text (:meth:`RunConfig.check_prompt_texts`; the lists' items,
#: :meth:`magpie.pipeline.steering.Steering.check_items`).  A test holds the
#: other settings that take text to a list that says why they do not.
PROMPT_FIELDS = frozenset(
    {
        "system",
        "system_preset",
        "systems",
        "personas",
        "persona_template",
        "topics",
        "topic_template",
        "judge_prompt",
    }
)


class RunConfig(BaseModel):
    """Every setting of ``magpie generate``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num: int = Field(100, gt=0, le=100_000_000, description="records the output should hold")
    output: str = Field("-", min_length=1, description="output JSONL path, - for stdout")
    overwrite: bool = False
    backend: BackendName = "auto"
    model: str | None = Field(None, min_length=1)
    #: One server URL, or several (requests are spread over all healthy hosts).
    host: str | list[str] | None = None
    #: Requests in flight per host when there are several (default: concurrency).
    per_host: int | None = Field(None, ge=1, le=1024)
    template: str = "auto"
    system: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    concurrency: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    timeout: float = Field(300.0, gt=0)
    max_retries: int = Field(5, ge=0)
    unreachable_budget: float = Field(120.0, ge=0)
    #: First retry delay in seconds; it doubles per retry (with jitter) up to backoff_max.
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(20.0, ge=0)
    #: Seconds pairs in flight get to finish after SIGINT/SIGTERM.
    grace_period: float = Field(10.0, ge=0)
    allow_mixed: bool = False
    keep_truncated: bool = False
    #: Reasoning models' thinking: keep it in the record, drop it, or ask the
    #: model not to think (``--reasoning``; see magpie.pipeline.stages.reasoning).
    reasoning: ReasoningMode = "keep"
    extra_stop: list[str] = Field(default_factory=list)
    #: The model's context in tokens (``--num-ctx``): sent to Ollama as
    #: ``options.num_ctx``, the embedded backend's context per sequence (4096
    #: when unset); None leaves it to the model and server.  Not for an
    #: OpenAI-compatible server, which fixes its own when it starts.  A config
    #: file's ``n_ctx`` (its old name) is read as this.
    num_ctx: int | None = Field(None, ge=256, le=16_777_216)
    threads: int | None = Field(None, ge=1)
    keep_alive: str | None = None
    #: Rule filters run on every instruction before its response is requested.
    filters: FilterSettings = Field(default_factory=FilterSettings)
    #: LLM judge: a model name (or a .gguf), or "same" for the generator itself.
    judge: str | None = None
    judge_backend: BackendName = "auto"
    judge_host: str | None = None
    judge_prompt: str | None = None
    #: ``--guard MODEL``: a Llama Guard style safety classifier of every
    #: instruction and response (on the generator's backend and host); its
    #: verdicts go into the record, and ``drop_unsafe`` rejects unsafe pairs.
    guard: str | None = Field(None, min_length=1)
    prejudge: bool = False
    min_quality: Quality | None = None
    min_difficulty: Difficulty | None = None
    min_response_score: int | None = Field(None, ge=1, le=10)
    categories: list[Category] | None = None
    drop_unsafe: bool = False
    #: Keep the judge's task categories near an even spread over ``categories``
    #: (or all twelve): each gets at most ceil(num / K * (1 + balance_tolerance))
    #: records; use with ``prejudge`` so that over-quota instructions cost no
    #: response.
    balance: bool = False
    balance_tolerance: float = Field(0.25, ge=0.0, le=10.0)
    #: Append rejected attempts (with their reasons) to this JSONL file.
    rejects: str | None = None
    #: Reject exact and near-duplicate instructions, also against the records
    #: already in the output (the index persists next to it as <output>.dedup.npz).
    dedup: bool = True
    #: Estimated Jaccard similarity (character 5-grams) from which two
    #: instructions count as near-duplicates.
    dedup_threshold: float = Field(0.7, gt=0.0, le=1.0)
    #: Semantic dedup: an embedding model (e.g. nomic-embed-text) on an Ollama
    #: or OpenAI-compatible server; None leaves it off.
    semantic_model: str | None = Field(None, min_length=1)
    #: Cosine similarity of the embeddings from which two instructions count as
    #: semantic duplicates.
    semantic_threshold: float = Field(DEFAULT_SEMANTIC_THRESHOLD, gt=0.0, le=1.0)
    #: Where the embedding model runs: default the generator's backend and
    #: first host when it is ollama or openai, else Ollama's default host.
    semantic_backend: Literal["ollama", "openai"] | None = None
    semantic_host: str | None = Field(None, min_length=1)
    #: Conversations of this many user turns.
    turns: int = Field(1, ge=1, le=8)
    #: Answers sampled per instruction (K >= 2: preference pairs with --judge).
    responses: int = Field(1, ge=1, le=16)
    preference_temperature: float = Field(0.8, ge=0.0, le=5.0)
    #: Instruction samples per pre-query request (OpenAI-compatible servers'
    #: ``n``; vLLM prefills the pre-query once for all of them).  At most 32:
    #: vLLM seeds choice j with seed + j, which then stays inside the first
    #: attempt's own seed slots, so no two samples of a run share a seed.
    samples_per_request: int = Field(1, ge=1, le=32)
    #: (temperature, top_p) pairs for instructions, cycled by record index.
    schedule: list[tuple[float, float]] | None = None
    #: A named task-control system prompt (math, code, translation).
    system_preset: str | None = None
    #: A weighted set of system prompts, one drawn per record:
    #: {name: {prompt = "...", weight = 1.0}} or {name: {preset = "math", weight = 2}}.
    systems: dict[str, SystemSpec] | None = None
    #: Personas (``--personas``): a built-in set's name or a file (one per line,
    #: or JSONL with a "persona" field); one is drawn per record and written into
    #: the system block through ``persona_template`` (default: DEFAULT_TEMPLATES).
    personas: str | None = Field(None, min_length=1)
    persona_template: str | None = Field(None, min_length=1)
    #: Topics (``--topics``), the same way.
    topics: str | None = Field(None, min_length=1)
    topic_template: str | None = Field(None, min_length=1)
    #: "i/N": this machine's share of a run split over N machines (0 <= i < N).
    shard: str | None = Field(None, pattern=r"^\d+/\d+$")
    instruction: Sampling = Field(default_factory=default_instruction_sampling)
    response: Sampling = Field(default_factory=default_response_sampling)
    quiet: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """``n_ctx`` (the embedded backend's setting before ``num_ctx`` served
        every backend) is read as ``num_ctx``."""
        if isinstance(data, Mapping) and "n_ctx" in data:
            data = dict(data)
            old = data.pop("n_ctx")
            if data.get("num_ctx") is None:
                data["num_ctx"] = old
        return data

    @field_validator("instruction", "response", mode="before")
    @classmethod
    def _over_stage_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A partial table changes only the keys it names."""
        if isinstance(value, Mapping):
            factory = (
                default_instruction_sampling
                if info.field_name == "instruction"
                else default_response_sampling
            )
            return {**factory().model_dump(), **value}
        return value

    @field_validator("categories", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """``--categories "Math,Coding & Debugging"``: labels in any case (exit 2
        on an unknown one)."""
        return parse_categories(value) if isinstance(value, str) else value

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            min_quality=self.min_quality,
            min_difficulty=self.min_difficulty,
            min_response_score=self.min_response_score,
            categories=self.categories,
            drop_unsafe=self.drop_unsafe,
        )

    @field_validator("host", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and len(value) == 1:
            return value[0]
        return value

    @property
    def hosts(self) -> list[str | None]:
        if isinstance(self.host, list):
            return list(self.host)
        return [self.host]

    @property
    def effective_system(self) -> str | None:
        """--system, or the text of --system-preset."""
        if self.system_preset is not None:
            return preset_prompt(self.system_preset)
        return self.system

    def steering(self) -> Steering | None:
        """The persona and topic lists, loaded and checked (exit 2 on a bad one);
        None when neither is asked for."""
        templates = dict(DEFAULT_TEMPLATES)
        lists: dict[str, SteerList | None] = {}
        for kind in ("persona", "topic"):
            spec, tpl = getattr(self, f"{kind}s"), getattr(self, f"{kind}_template")
            if spec is None and tpl is not None:
                raise UsageError(f"--{kind}-template needs --{kind}s")
            lists[kind] = load_list(spec, kind) if spec is not None else None  # type: ignore[arg-type]
            if tpl is not None:
                templates[kind] = check_template(tpl, kind)  # type: ignore[index,arg-type]
        if lists["persona"] is None and lists["topic"] is None:
            return None
        return Steering(lists["persona"], lists["topic"], templates)  # type: ignore[arg-type]

    def prompt_texts(self) -> list[tuple[str, str]]:
        """Every user-given text of the run that reaches a prompt, with the
        flag that gives it (:data:`PROMPT_FIELDS`; the persona and topic lists'
        items are :meth:`steering`'s): the system prompt, a preset's text, each
        ``[systems]`` entry, the persona and topic templates, the judge's
        system prompt file."""
        texts: list[tuple[str, str]] = []
        if self.system is not None:
            texts.append(("--system", self.system))
        if self.system_preset is not None:
            texts.append((f"--system-preset {self.system_preset}", self.effective_system or ""))
        for name, spec in (self.systems or {}).items():
            texts.append((f"[systems.{name}]", spec.text()))
        for kind in ("persona", "topic"):
            template = getattr(self, f"{kind}_template")
            if template is not None:
                texts.append((f"--{kind}-template", template))
        if self.judge_prompt is not None:
            texts.append(
                (f"--judge-prompt {self.judge_prompt}", read_prompt_file(self.judge_prompt))
            )
        return texts

    def check_prompt_texts(self, forbidden: Iterable[str] = ()) -> None:
        """The one check of every user text that reaches a prompt (exit 2):
        no template token (any known family's, and the model's ``forbidden``
        once its template is resolved) and no role header in any of
        :meth:`prompt_texts`."""
        marks = tuple(forbidden)
        for what, text in self.prompt_texts():
            check_prompt_text(what, text, marks)

    @property
    def shard_spec(self) -> tuple[int, int]:
        if not self.shard:
            return 0, 1
        i, n = (int(x) for x in self.shard.split("/"))
        if not (n >= 1 and 0 <= i < n):
            raise UsageError(f"--shard {self.shard}: use i/N with 0 <= i < N, e.g. 0/4")
        return i, n

    @property
    def generator_spec(self) -> BackendSpec:
        """The generator's backend: ``--backend``, ``--model``, ``--host``."""
        return BackendSpec(
            backend=self.backend,
            model=self.model,
            host=self.host,
            per_host=self.per_host,
            concurrency=self.concurrency,
            timeout=self.timeout,
            keep_alive=self.keep_alive,
            num_ctx=self.num_ctx,
            retry=self.start_retry,
            threads=self.threads,
        )

    @property
    def judge_spec(self) -> BackendSpec:
        """The judge's backend: ``--judge MODEL`` on ``--judge-backend`` at
        ``--judge-host`` (default: the generator's host)."""
        return self.generator_spec.model_copy(
            update={
                "backend": self.judge_backend,
                "model": self.judge,
                "host": self.judge_host or self.host,
            }
        )

    @property
    def guard_spec(self) -> BackendSpec:
        """The guard's backend: ``--guard MODEL`` on the generator's backend and host."""
        return self.generator_spec.model_copy(update={"model": self.guard})

    def semantic_target(self, generator: str | None = None) -> tuple[str, str | None]:
        """The backend (``ollama`` or ``openai``) and host of the embedding model.

        ``semantic_backend`` and ``semantic_host`` when set.  Otherwise the
        generator's backend (``generator``: the one a run resolved, else
        ``backend``) when it is ollama or openai, with its first host; for the
        embedded generator (and ``magpie dedup``/``merge``, which have none),
        Ollama at its default host (``$OLLAMA_HOST`` or http://127.0.0.1:11434).
        A host of None means the backend's default.
        """
        gen = generator or self.backend
        traits = BACKENDS.get(gen)
        name = self.semantic_backend or (gen if traits and traits.embeds else DEFAULT_EMBEDDER)
        host = self.semantic_host
        if host is None and name == gen:
            host = self.hosts[0]
        return name, host

    def semantic_spec(self, generator: str | None = None) -> BackendSpec:
        """The embedding model's backend (see :meth:`semantic_target`)."""
        name, host = self.semantic_target(generator)
        return self.generator_spec.model_copy(
            update={"backend": name, "model": self.semantic_model or "", "host": host}
        )

    def check_hosts(self) -> None:
        """Each ``--host`` and ``--judge-host`` by the rules of the backend that
        will use it (:attr:`BackendTraits.check_url`; exit 2 on a bad one)."""
        check = BACKENDS[self.backend].check_url
        for host in self.hosts:
            if host is not None:
                check(host, "--host")
        if self.judge_host is not None:
            BACKENDS[self.judge_backend].check_url(self.judge_host, "--judge-host")

    def validate_semantic(self) -> None:
        """The checks of the semantic settings that need no server (exit 2)."""
        if not self.semantic_model:
            return
        if not self.dedup:
            raise UsageError(
                "--semantic-model needs dedup on: drop --no-dedup (or the setting dedup = false)"
            )
        from magpie.backends.registry import looks_like_gguf

        name, host = self.semantic_target()
        traits = BACKENDS[name]
        if not traits.model_ids_are_paths and looks_like_gguf(self.semantic_model):
            raise UsageError(
                f"--semantic-model {self.semantic_model!r} is a file: name an embedding model "
                "on an Ollama or OpenAI-compatible server, e.g. nomic-embed-text"
            )
        if self.semantic_host is None or host is None:
            return
        traits.check_url(host, "--semantic-host")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            unreachable_budget=self.unreachable_budget,
        )

    @property
    def start_retry(self) -> RetryPolicy:
        """The retries of the first request to a backend (``describe``): 5xx
        and timeouts are retried like any request, but a refused connection is
        not: the server is down, say so at once (exit 3)."""
        return self.retry.model_copy(update={"unreachable_budget": 0.0})

    def pipeline_settings(self, concurrency: int) -> PipelineSettings:
        """The pipeline's section of these settings: every field of
        :class:`PipelineSettings` that a field here of the same name sets, and
        the ones derived here; ``concurrency`` is the resolved number (``auto``
        is the backend's own)."""
        shared = PipelineSettings.model_fields.keys() & type(self).model_fields.keys()
        shard_index, shard_count = self.shard_spec
        derived = {
            "concurrency": concurrency,
            "retry": self.retry,
            "thresholds": self.thresholds,
            "shard_index": shard_index,
            "shard_count": shard_count,
        }
        return PipelineSettings(**{name: getattr(self, name) for name in shared} | derived)
