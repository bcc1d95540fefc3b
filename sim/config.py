"""Run configs in the Psyche layout: configs/<name>/state.toml + config.json.

state.toml is read as the subset of Psyche's schema that a simulation needs
(batch, steps, sequence length, lr schedule, DisTrO settings), plus matsim's own
[matsim.data] table (the synthetic source behind data_location = "Dummy"); the other
Psyche keys (witness timing, checkpoints on the hub, ...) are accepted and
ignored so Psyche configs load unchanged. config.json is an HF model config.
Every value read is validated here, once, with a ConfigError naming it.
"""
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sim.data import MarkovSpec
from sim.errors import ConfigError
from sim.tiers import max_tier

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "nanogpt-20m-run"
MATRIX_CONFIG = "ffn-small"   # `make run`: the CI config of the convergence checks
# Receivers' modes, by their flag names: sim/aggregate.py's MeanSemantics ("coeff" is COEFF_MEAN) and ApplyRule.
MEAN_SEMANTICS = ("coeff", "peer", "region")
APPLY_RULES = ("sign", "sgd", "adamw")
STYLES = ("llama", "nanogpt")
# Psyche's state.toml names the architecture, config.json names the model_type.
ARCHITECTURES = {"HfLlama": "llama", "HfNanoGPT": "nanogpt"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "nanogpt": "NanoGPTForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    style: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.style not in STYLES:
            raise ConfigError(f"model style {self.style!r} is unknown: valid styles are {', '.join(STYLES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} {value!r} is invalid: expected an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}: choose heads that divide it")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads {self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}: choose a divisor")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} (hidden_size / num_attention_heads) is odd: "
                              f"RoPE needs an even head dimension")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} {value!r} is invalid: expected a finite number > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tier(self) -> int:
        return max_tier(self.intermediate_size)

    def to_hf_dict(self) -> dict:
        """The HF config.json fields (LlamaConfig's names; nanogpt adds its MLP flag)."""
        hf = {
            "architectures": [HF_ARCHITECTURES[self.style]],
            "model_type": self.style,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "attention_bias": False,
            "hidden_act": "silu" if self.style == "llama" else "relu2",
        }
        if self.style == "nanogpt":
            hf["use_relu_squared_mlp"] = True
        return hf

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        style = hf.get("model_type")
        if style not in STYLES:
            raise ConfigError(f"{source}: model_type {style!r} is unknown: valid model types are {', '.join(STYLES)}")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias true is not supported: matsim models have no attention bias")
        if "head_dim" in hf and hf["head_dim"] * hf.get("num_attention_heads", 0) != hf.get("hidden_size"):
            raise ConfigError(f"{source}: head_dim {hf['head_dim']} disagrees with hidden_size / num_attention_heads")
        try:
            return cls(
                style=style,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
                rope_theta=rope_theta,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: required field {missing.args[0]!r} is missing") from None


@dataclass(frozen=True)
class DistroConfig:
    """Psyche's [model.LLM.optimizer.Distro]."""
    compression_decay: float = 0.999
    compression_chunk: int = 64
    compression_topk: int = 8
    quantize_1bit: bool = True
    weight_decay: float = 0.0   # decoupled, applied by every receiver with the update

    def __post_init__(self):
        if not 0.0 <= self.compression_decay <= 1.0:
            raise ConfigError(f"compression_decay {self.compression_decay!r} is outside [0, 1]")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0.0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay {self.weight_decay!r} is invalid: expected a number >= 0")
        for name in ("compression_chunk", "compression_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} {value!r} is invalid: expected an integer >= 1")


@dataclass(frozen=True)
class CosineSchedule:
    """Psyche's [model.LLM.lr_schedule.Cosine]."""
    base_lr: float = 1e-3
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    total_steps: int = 100
    final_lr: float = 1e-4

    def __post_init__(self):
        for name in ("base_lr", "warmup_init_lr", "final_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"lr_schedule {name} {value!r} is invalid: expected a finite number >= 0")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError(f"lr_schedule warmup_steps {self.warmup_steps} / total_steps {self.total_steps} "
                              f"are invalid: expected warmup_steps >= 0 and total_steps >= 1")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_init_lr + (self.base_lr - self.warmup_init_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: ModelConfig
    seq_len: int
    global_batch_size: int
    total_steps: int
    min_clients: int = 1
    max_round_train_time: float = 30.0
    data: str = "Dummy"
    lr_schedule: CosineSchedule = field(default_factory=CosineSchedule)
    distro: DistroConfig = field(default_factory=DistroConfig)
    helper_rotation_interval: int = 4   # rounds per helper-mode rotation epoch (sim/helper.py)
    markov: MarkovSpec = field(default_factory=MarkovSpec)   # the "Dummy" source ([matsim.data])
    # How receivers combine and apply payloads ([matsim] mean_semantics / apply_rule, or the
    # testnet's --matformer-mean-semantics / --apply-rule): matsim's defaults; Psyche's
    # heterogeneous path divides by contributing peers ("peer").
    mean_semantics: str = "coeff"
    apply_rule: str = "sign"
    path: Path | None = None

    def __post_init__(self):
        for name in ("seq_len", "global_batch_size", "total_steps", "min_clients", "helper_rotation_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} {value!r} is invalid: expected an integer >= 1")
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"max_seq_len {self.seq_len} exceeds max_position_embeddings "
                              f"{self.model.max_position_embeddings}")
        if self.mean_semantics not in MEAN_SEMANTICS:
            raise ConfigError(f"mean semantics {self.mean_semantics!r} is unknown: valid are {', '.join(MEAN_SEMANTICS)}")
        if self.apply_rule not in APPLY_RULES:
            raise ConfigError(f"apply rule {self.apply_rule!r} is unknown: valid are {', '.join(APPLY_RULES)}")

    @property
    def modes(self) -> dict:
        """What receivers do with the payloads, as a run's record names it."""
        return {"mean_semantics": self.mean_semantics, "apply_rule": self.apply_rule,
                "weight_decay": self.distro.weight_decay}

    @property
    def client_batch(self) -> int:
        """Sequences one client trains per round: its share of the global batch (Psyche splits it)."""
        return max(1, self.global_batch_size // self.min_clients)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def resolve_config_path(path: str | Path) -> Path:
    """A config directory, given as a path or as a bare name under configs/."""
    candidate = Path(path)
    if candidate.is_dir():
        return candidate
    bundled = REPO_ROOT / "configs" / str(path)
    if candidate.parent == Path(".") and bundled.is_dir():
        return bundled
    available = sorted(p.name for p in (REPO_ROOT / "configs").iterdir() if p.is_dir())
    raise ConfigError(f"config path {str(path)!r} does not exist: give a directory holding state.toml and "
                      f"config.json, or one of the bundled configs: {', '.join(available)}")


def _section(table: dict, dotted: str, source: str) -> dict:
    node = table
    for key in dotted.split("."):
        node = node.get(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: [{dotted}] must be a table, got {node!r}")
    return node


def _one_of(table: dict, dotted: str, allowed: tuple[str, ...], source: str) -> tuple[str, dict] | None:
    """Psyche encodes enums as a table with one key: [model.LLM.optimizer.Distro]."""
    node = _section(table, dotted, source)
    if not node:
        return None
    if len(node) != 1 or next(iter(node)) not in allowed:
        raise ConfigError(f"{source}: [{dotted}] has {sorted(node)}: matsim supports exactly one of {list(allowed)}")
    key, value = next(iter(node.items()))
    return key, value


def _data_location(value, source: str) -> str:
    if value == "Dummy":
        return "Dummy"
    if isinstance(value, dict) and set(value) == {"Local"} and isinstance(value["Local"], str):
        return value["Local"]
    raise ConfigError(f"{source}: data_location {value!r} is not supported: use \"Dummy\" (the synthetic "
                      f"Markov source) or {{ Local = \"path/to/file\" }} (a byte corpus)")


def _build(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}: valid keys are {sorted(known)}")
    return cls(**values)


def load_config(path: str | Path = DEFAULT_CONFIG) -> RunConfig:
    """Load and validate configs/<name>/state.toml + config.json."""
    directory = resolve_config_path(path)
    state_path, hf_path = directory / "state.toml", directory / "config.json"
    for required in (state_path, hf_path):
        if not required.is_file():
            raise ConfigError(f"config directory {str(directory)!r} has no {required.name}: "
                              f"a config is a directory with state.toml and config.json")
    try:
        state = tomllib.loads(state_path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{state_path}: not valid TOML ({err})") from None
    try:
        hf = json.loads(hf_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{hf_path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{hf_path}: expected a JSON object, got {type(hf).__name__}")

    model = ModelConfig.from_hf_dict(hf, source=str(hf_path))
    run, llm = _section(state, "config", str(state_path)), _section(state, "model.LLM", str(state_path))
    architecture = llm.get("architecture")
    if architecture is not None and ARCHITECTURES.get(architecture) != model.style:
        raise ConfigError(f"{state_path}: architecture {architecture!r} contradicts config.json model_type "
                          f"{model.style!r}: valid pairs are {ARCHITECTURES}")

    schedule = _one_of(state, "model.LLM.lr_schedule", ("Cosine",), str(state_path))
    optimizer = _one_of(state, "model.LLM.optimizer", ("Distro",), str(state_path))
    if "max_seq_len" not in llm or "total_steps" not in run or "global_batch_size_start" not in run:
        raise ConfigError(f"{state_path}: needs model.LLM.max_seq_len, config.total_steps and "
                          f"config.global_batch_size_start")
    return RunConfig(
        name=state.get("run_id", directory.name),
        model=model,
        seq_len=llm["max_seq_len"],
        global_batch_size=run["global_batch_size_start"],
        total_steps=run["total_steps"],
        min_clients=run.get("min_clients", 1),
        max_round_train_time=run.get("max_round_train_time", 30.0),
        helper_rotation_interval=run.get("matformer_helper_rotation_interval", 4),
        data=_data_location(llm.get("data_location", "Dummy"), str(state_path)),
        lr_schedule=_build(CosineSchedule, schedule[1], f"{state_path} [lr_schedule.Cosine]") if schedule else CosineSchedule(),
        distro=_build(DistroConfig, optimizer[1], f"{state_path} [optimizer.Distro]") if optimizer else DistroConfig(),
        markov=_build(MarkovSpec, _section(state, "matsim.data", str(state_path)), f"{state_path} [matsim.data]"),
        **_modes(_section(state, "matsim", str(state_path)), str(state_path)),
        path=directory,
    )


def _modes(table: dict, source: str) -> dict:
    """[matsim] mean_semantics and apply_rule (and the [matsim.data] table, read on its own)."""
    unknown = sorted(set(table) - {"data", "mean_semantics", "apply_rule"})
    if unknown:
        raise ConfigError(f"{source}: [matsim] has unknown keys {unknown}: valid are data, mean_semantics "
                          f"({', '.join(MEAN_SEMANTICS)}) and apply_rule ({', '.join(APPLY_RULES)})")
    for key, valid in (("mean_semantics", MEAN_SEMANTICS), ("apply_rule", APPLY_RULES)):
        if key in table and table[key] not in valid:
            raise ConfigError(f"{source}: [matsim] {key} = {table[key]!r} is unknown: valid are {', '.join(valid)}")
    return {key: table[key] for key in ("mean_semantics", "apply_rule") if key in table}
