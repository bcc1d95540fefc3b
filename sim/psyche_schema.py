"""Whether Psyche itself accepts a run config, as its code at HEAD reads one.

Two layouts: a local testnet's state.toml deserializes into `Coordinator`
(shared/coordinator/src/coordinator.rs: run_id, run_state, model and config required,
progress and the epoch state defaulted), a Solana run's config into `{ config, model }`
(architectures/decentralized/solana-client/src/command/update_config.rs). Both go through
serde with Psyche's types: every field required unless it is an Option or defaulted, enums
externally tagged (a unit variant a string, any other a table of one key), integers in
their width, unknown keys ignored. Then the checks Psyche applies before it runs one:
`CoordinatorConfig::check` (the centralized server refuses with "Coordinator sanity check
failed"; here each failing condition is named) and `Model::check` (the Solana coordinator's,
with its own messages).

`psyche_verdict` says why Psyche would refuse a file (nothing: it runs it) and the keys it
would ignore. matsim's own tables ([matsim], [matsim.data]) are ignored by Psyche and read
by matsim; every other key Psyche ignores, matsim ignores too, and names.
"""
from dataclasses import dataclass

# --- Psyche's types, as serde reads them ------------------------------------------------

U8, U16, U32, U64 = ("u8", 8), ("u16", 16), ("u32", 32), ("u64", 64)
F32, F64, BOOL, STRING = "f32", "f64", "bool", "string"   # FixedString: any string (truncated, not refused)


@dataclass(frozen=True)
class Struct:
    fields: dict          # name -> type
    optional: tuple = ()  # Option<T> fields and #[serde(default)] ones: may be missing


@dataclass(frozen=True)
class Enum:
    variants: dict        # name -> the variant's content type, or None for a unit variant


@dataclass(frozen=True)
class Array:
    of: object
    length: int


HUB_REPO = Struct({"repo_id": STRING, "revision": STRING}, optional=("revision",))
SCHEDULE_FIELDS = {"base_lr": F64, "warmup_init_lr": F64, "warmup_steps": U32}
LLM = Struct({
    "max_seq_len": U32,
    "cold_start_warmup_steps": U32,
    "architecture": Enum({"HfLlama": None, "HfDeepseek": None, "HfNanoGPT": None, "HfAuto": None}),
    "checkpoint": Enum({"Ephemeral": None, "Dummy": HUB_REPO, "Hub": HUB_REPO, "P2P": HUB_REPO}),
    "data_type": Enum({"Pretraining": None, "Finetuning": None}),
    "data_location": Enum({
        "Dummy": None, "Server": STRING, "Local": STRING, "WeightedHttp": STRING, "Preprocessed": STRING,
        "Http": Struct({
            "location": Enum({"SingleUrl": STRING,
                              "NumberedFiles": Struct({"url_template": STRING, "start_index": U32,
                                                       "n_left_pad_zeros": U8, "num_files": U32}),
                              "Gcp": Struct({"bucket_name": STRING, "filter_directory": STRING})}),
            "token_size_in_bytes": Enum({"TwoBytes": None, "FourBytes": None}),
            "shuffle": Enum({"DontShuffle": None, "Seeded": Array(U8, 32)})}),
    }),
    "lr_schedule": Enum({
        "Constant": Struct(SCHEDULE_FIELDS),
        "Linear": Struct({**SCHEDULE_FIELDS, "final_lr": F64, "total_steps": U32}),
        "Cosine": Struct({**SCHEDULE_FIELDS, "final_lr": F64, "total_steps": U32}),
        "WarmupStableDecay": Struct({**SCHEDULE_FIELDS, "cosine_decay_final_lr": F64, "linear_decay_final_lr": F64,
                                     "stable_steps": U32, "cosine_decay_steps": U32, "linear_decay_steps": U32}),
    }),
    "optimizer": Enum({
        "Dummy": None,
        "AdamW": Struct({"betas": Array(F32, 2), "weight_decay": F32, "eps": F32, "clip_grad_norm": F32},
                        optional=("clip_grad_norm",)),
        "Distro": Struct({"clip_grad_norm": F32, "weight_decay": F32, "compression_decay": F32,
                          "compression_topk": U16, "compression_chunk": U16, "quantize_1bit": BOOL},
                         optional=("clip_grad_norm", "weight_decay")),
    }),
})
COORDINATOR_CONFIG = Struct({
    "warmup_time": U64, "cooldown_time": U64, "max_round_train_time": U64, "round_witness_time": U64,
    "global_batch_size_warmup_tokens": U64, "epoch_time": U64, "total_steps": U32, "init_min_clients": U16,
    "min_clients": U16, "witness_nodes": U16, "global_batch_size_start": U16, "global_batch_size_end": U16,
    "verification_percent": U8, "waiting_for_members_extra_time": U8,
})
RUN_STATES = ("Uninitialized", "WaitingForMembers", "Warmup", "RoundTrain", "RoundWitness", "Cooldown", "Finished",
              "Paused")
# A local testnet's state.toml: `Coordinator`; what a file may also hold that serde defaults.
STATE = Struct({"run_id": STRING, "run_state": Enum(dict.fromkeys(RUN_STATES)), "model": Enum({"LLM": LLM}),
                "config": COORDINATOR_CONFIG, "progress": None, "epoch_state": None,
                "run_state_start_unix_timestamp": None, "pending_pause": None},
               optional=("progress", "epoch_state", "run_state_start_unix_timestamp", "pending_pause"))
SOLANA = Struct({"config": COORDINATOR_CONFIG, "model": Enum({"LLM": LLM})})
LAYOUTS = {"state": STATE, "solana": SOLANA}
MATSIM_KEYS = ("matsim",)   # matsim's own table: Psyche ignores it, matsim reads it
SOLANA_MAX_NUM_CLIENTS, SOLANA_MAX_NUM_WITNESSES = 256, 32


class Refused(Exception):
    """Psyche's serde stops at the first error: this is it."""


def layout_of(table: dict) -> str:
    """"state" (a local testnet's Coordinator) where the file names a run_id or run_state,
    else "solana" (the { config, model } a Solana run's config is)."""
    return "state" if {"run_id", "run_state"} & set(table) else "solana"


def _type_name(kind) -> str:
    return kind[0] if isinstance(kind, tuple) else kind if isinstance(kind, str) else type(kind).__name__


def _read(value, kind, path: str, ignored: list, strict: bool = True) -> None:
    """Raise Refused as serde would (unless not `strict`: then only walk), and collect the keys
    it would ignore."""
    try:
        _check(value, kind, path, ignored, strict)
    except Refused:
        if strict:
            raise


def _check(value, kind, path: str, ignored: list, strict: bool) -> None:
    if kind is None:   # defaulted state (progress, epoch state): matsim does not model it
        return
    if isinstance(kind, tuple):
        name, bits = kind
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected {name}")
        if not 0 <= value < 2 ** bits:
            raise Refused(f"{_at(path)}invalid value: integer `{value}`, expected {name}")
    elif kind in (F32, F64):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected {kind}")
    elif kind == BOOL:
        if not isinstance(value, bool):
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected a boolean")
    elif kind == STRING:
        if not isinstance(value, str):
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected a string")
    elif isinstance(kind, Array):
        if not isinstance(value, list) or len(value) != kind.length:
            raise Refused(f"{_at(path)}invalid length or type {_shown(value)}, expected an array of {kind.length}")
        for i, item in enumerate(value):
            _read(item, kind.of, f"{path}[{i}]", ignored, strict)
    elif isinstance(kind, Struct):
        if not isinstance(value, dict):
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected a table")
        for name, field in kind.fields.items():
            if name not in value:
                if name in kind.optional or not strict:
                    continue
                raise Refused(f"{_at(path)}missing field `{name}`")
            _read(value[name], field, f"{path}.{name}" if path else name, ignored, strict)
        ignored.extend(f"{path}.{k}" if path else k for k in value if k not in kind.fields
                       and not (not path and k in MATSIM_KEYS))
    elif isinstance(kind, Enum):
        expected = ", ".join(f"`{v}`" for v in kind.variants)
        if isinstance(value, str):
            if value not in kind.variants:
                raise Refused(f"{_at(path)}unknown variant `{value}`, expected one of {expected}")
            if kind.variants[value] is not None:
                raise Refused(f"{_at(path)}invalid type: unit variant `{value}`, expected a table [{path}.{value}]")
            return
        if not isinstance(value, dict) or len(value) != 1:
            raise Refused(f"{_at(path)}invalid type: {_shown(value)}, expected one of {expected}")
        (variant, content), = value.items()
        if variant not in kind.variants:
            raise Refused(f"{_at(path)}unknown variant `{variant}`, expected one of {expected}")
        if kind.variants[variant] is None:
            raise Refused(f"{_at(path)}`{variant}` is a unit variant: write {path} = \"{variant}\"")
        _read(content, kind.variants[variant], f"{path}.{variant}", ignored, strict)


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def _shown(value) -> str:
    return {bool: "boolean", int: "integer", float: "floating point", str: "string", list: "sequence",
            dict: "map"}.get(type(value), type(value).__name__) + f" `{value}`"


def coordinator_config_check(config: dict) -> list[str]:
    """The conditions of CoordinatorConfig::check that `config` fails, each named."""
    c, failed = config, []
    conditions = [
        (c["max_round_train_time"] != 0, "max_round_train_time != 0"),
        (c["round_witness_time"] != 0, "round_witness_time != 0"),
        (c["min_clients"] != 0, "min_clients != 0"),
        (c["init_min_clients"] >= c["min_clients"], "init_min_clients >= min_clients"),
        (c["init_min_clients"] <= SOLANA_MAX_NUM_CLIENTS, f"init_min_clients <= {SOLANA_MAX_NUM_CLIENTS}"),
        (c["global_batch_size_start"] != 0, "global_batch_size_start != 0"),
        (c["global_batch_size_end"] != 0, "global_batch_size_end != 0"),
        (c["global_batch_size_end"] >= c["global_batch_size_start"], "global_batch_size_end >= global_batch_size_start"),
        (c["total_steps"] != 0, "total_steps != 0"),
        (c["witness_nodes"] <= c["min_clients"], "witness_nodes <= min_clients"),
        (c["witness_nodes"] <= SOLANA_MAX_NUM_WITNESSES, f"witness_nodes <= {SOLANA_MAX_NUM_WITNESSES}"),
        (c["cooldown_time"] > 0, "cooldown_time > 0"),
        (c["waiting_for_members_extra_time"] > 0, "waiting_for_members_extra_time > 0"),
    ]
    for holds, condition in conditions:
        if not holds:
            name = condition.split()[0]
            failed.append(f"CoordinatorConfig::check: {condition} fails ({name} = {c[name]})")
    return failed


def model_check(llm: dict) -> list[str]:
    """Model::check's refusals of a [model.LLM] table, in its own words."""
    if llm["max_seq_len"] == 0:
        return ["Model::check: model check failed: max_seq_len is 0."]
    (kind, where), = (llm["data_location"].items() if isinstance(llm["data_location"], dict)
                      else [(llm["data_location"], None)])
    bad = {"Server": lambda: not where, "WeightedHttp": lambda: not where, "Preprocessed": lambda: not where,
           "Http": lambda: _bad_http(where["location"])}.get(kind, lambda: False)()
    if bad:
        return ["Model::check: model check failed: bad LLM training data location."]
    checkpoint = llm["checkpoint"]
    kind, repo = (checkpoint, None) if isinstance(checkpoint, str) else next(iter(checkpoint.items()))
    if kind == "Ephemeral" or (kind in ("Hub", "P2P") and not repo["repo_id"]):
        return ["Model::check: model check failed: bad checkpoint"]
    if llm["optimizer"] == "Dummy":
        return ["Model::check: model check failed: bad optimizer"]
    return []


def _bad_http(location) -> bool:
    (kind, value), = location.items()
    if kind == "SingleUrl":
        return not value
    if kind == "NumberedFiles":
        return not value["url_template"] or value["num_files"] == 0
    return not value["bucket_name"]


@dataclass(frozen=True)
class Verdict:
    refused: tuple[str, ...]   # why Psyche refuses the file (empty: it runs it)
    ignored: tuple[str, ...]   # keys Psyche's serde skips
    layout: str                # "state" or "solana"
    # Model::check on a state.toml: the centralized server never applies it, a Solana run would.
    solana_would_refuse: tuple[str, ...] = ()


def psyche_verdict(table: dict) -> Verdict:
    """How Psyche at HEAD takes this parsed TOML file: serde, then the checks its runner applies
    (the centralized server: CoordinatorConfig::check; the Solana coordinator: that and
    Model::check)."""
    layout, ignored = layout_of(table), []
    try:
        _read(table, LAYOUTS[layout], "", ignored)
    except Refused as refusal:
        ignored = []   # serde stops at its first error: what it would skip, from a walk of the rest
        _read(table, LAYOUTS[layout], "", ignored, strict=False)
        try:   # and what its check would say next, where the fields it reads are there
            later = tuple(f"past that, {reason}" for reason in coordinator_config_check(table["config"]))
        except (KeyError, TypeError):
            later = ()
        return Verdict((f"serde: {refusal}", *later), tuple(ignored), layout)
    model = tuple(model_check(table["model"]["LLM"]))
    refused = tuple(coordinator_config_check(table["config"])) + (model if layout == "solana" else ())
    return Verdict(refused, tuple(ignored), layout, model if layout == "state" else ())
