"""Run configs in the Psyche layout: <config>/state.toml + config.json.

A state.toml (or a Solana run's config, the same [config] and [model] without run_id) is
first held to what Psyche at HEAD accepts (sim/psyche_schema.py: its serde's required fields
and types, CoordinatorConfig::check, and Model::check where Psyche applies it): a file Psyche
refuses is refused here with Psyche's reason, unless the run accepts it anyway
(`accept_stale`, --accept-stale-config), which the run then records. The keys Psyche ignores
are ignored and named (`RunConfig.ignored`). matsim then reads the subset a simulation needs
(batch, steps, sequence length, lr schedule, optimizer), plus its own [matsim] table (modes,
and [matsim.data]: the synthetic source behind data_location = "Dummy"). config.json is an
HF model config. Every value read is validated here, once, with a ConfigError naming it.
"""
import dataclasses
import json
import importlib.resources
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sim.data import MarkovSpec
from sim.errors import ConfigError
from sim.psyche_schema import psyche_verdict
from sim.sources import checkpoint_form, data_override, model_config_path, read_data_location, variant
from sim.schedule import SCHEDULES, CosineSchedule, Schedule, cold_start_factor
from sim.tiers import max_tier

# The bundled configs ship inside the package, so an installed matsim finds them as a checkout does.
CONFIGS = Path(str(importlib.resources.files("sim") / "configs"))
DEFAULT_CONFIG = "nanogpt-20m-run"
MATRIX_CONFIG = "ffn-small"   # `make run`: the CI config of the convergence checks
# Receivers' modes, by their flag names: sim/aggregate.py's MeanSemantics ("coeff" is COEFF_MEAN) and ApplyRule.
MEAN_SEMANTICS = ("coeff", "peer", "region")
APPLY_RULES = ("sign", "sgd", "adamw")
ZERO_BLOCKS = ("absent", "sent")   # sim/distro.py
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
    clip_grad_norm: float | None = None   # each peer clips its own gradient's norm before compressing
    # matsim's [matsim] zero_blocks, not Psyche's key: how exact-zero top-k coefficients (an
    # all-zero block's) go out: "absent" (matsim) or "sent" at their indices, as DeMo and Psyche do.
    zero_blocks: str = "absent"

    def __post_init__(self):
        if not 0.0 <= self.compression_decay <= 1.0:
            raise ConfigError(f"compression_decay {self.compression_decay!r} is outside [0, 1]")
        _check_number("weight_decay", self.weight_decay, "optimizer.Distro")
        if self.clip_grad_norm is not None:
            _check_number("clip_grad_norm", self.clip_grad_norm, "optimizer.Distro")
        if self.zero_blocks not in ZERO_BLOCKS:
            raise ConfigError(f"zero blocks {self.zero_blocks!r} is unknown: valid are {', '.join(ZERO_BLOCKS)}")
        for name in ("compression_chunk", "compression_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} {value!r} is invalid: expected an integer >= 1")


@dataclass(frozen=True)
class AdamWConfig:
    """Psyche's [model.LLM.optimizer.AdamW]: every client steps its own torch AdamW on its own
    gradient, and nothing is exchanged (Psyche's trainer returns no DisTrO results for it)."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    clip_grad_norm: float | None = None

    def __post_init__(self):
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"optimizer.AdamW betas {betas!r} is invalid: expected a list of two numbers in "
                              f"[0, 1), e.g. [0.9, 0.95]")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        _check_number("weight_decay", self.weight_decay, "optimizer.AdamW")
        _check_number("eps", self.eps, "optimizer.AdamW", positive=True)
        if self.clip_grad_norm is not None:
            _check_number("clip_grad_norm", self.clip_grad_norm, "optimizer.AdamW")


def _check_number(name: str, value, where: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ConfigError(f"{where} {name} {value!r} is invalid: expected a finite number "
                          f"{'> 0' if positive else '>= 0'}")


# Psyche's OptimizerDefinition variants.
OPTIMIZERS = ("Distro", "AdamW", "Dummy")


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: ModelConfig
    seq_len: int
    global_batch_size: int          # Psyche's global_batch_size_start
    total_steps: int
    min_clients: int = 1
    max_round_train_time: float = 30.0
    round_witness_time: float = 0.0   # with max_round_train_time, the round's deadline (NetworkFaults)
    # What the run reads: "Dummy" (the synthetic source) or a local byte corpus; None when
    # state.toml names data matsim cannot reach (data_location says what; --data-location substitutes).
    data: str | None = "Dummy"
    data_location: str = "Dummy"    # the config's own data_location, as Psyche's form and value
    lr_schedule: Schedule = field(default_factory=CosineSchedule)
    optimizer: str = "Distro"
    distro: DistroConfig = field(default_factory=DistroConfig)
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    # Psyche's [config] keys that change what a round is: the global batch ramps linearly from
    # global_batch_size (start) to global_batch_size_end over the first warmup tokens; the
    # first epoch's first cold_start_warmup_steps scale the rate up from 0.
    global_batch_size_end: int | None = None
    global_batch_size_warmup_tokens: int = 0
    cold_start_warmup_steps: int = 0
    checkpoint: str = "Dummy"       # the config's checkpoint form: where Psyche's run starts from
    helper_rotation_interval: int = 4   # rounds per helper-mode rotation epoch (sim/helper.py)
    markov: MarkovSpec = field(default_factory=MarkovSpec)   # the "Dummy" source ([matsim.data])
    # How receivers combine and apply payloads ([matsim] mean_semantics / apply_rule, or the
    # testnet's --matformer-mean-semantics / --apply-rule): matsim's defaults; Psyche's
    # heterogeneous path divides by contributing peers ("peer").
    mean_semantics: str = "coeff"
    apply_rule: str = "sign"
    # Psyche's client flag --micro-batch-size: a trainer's batch is split into ceil(batch / m)
    # micro-batches whose gradients accumulate (sim/peer.py); None: the whole batch at once.
    micro_batch_size: int | None = None
    overrides: tuple = ()           # (key, what the config said, what the run used): substitutions a run records
    ignored: tuple = ()             # keys of the file Psyche's serde skips, so matsim does too
    refused: tuple = ()             # why Psyche refuses the file, when the run accepted it anyway
    path: Path | None = None

    def __post_init__(self):
        for name in ("seq_len", "global_batch_size", "total_steps", "min_clients", "helper_rotation_interval"):
            _check_count(name, getattr(self, name), 1)
        for name in ("global_batch_size_warmup_tokens", "cold_start_warmup_steps"):
            _check_count(name, getattr(self, name), 0)
        if self.micro_batch_size is not None:
            _check_count("micro_batch_size", self.micro_batch_size, 1)
        end = self.global_batch_size_end
        if end is not None:
            _check_count("global_batch_size_end", end, 1)
        if end is not None and end < self.global_batch_size:
            raise ConfigError(f"global_batch_size_end {end} is below global_batch_size_start "
                              f"{self.global_batch_size}: Psyche's batch only ramps up")
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"max_seq_len {self.seq_len} exceeds max_position_embeddings "
                              f"{self.model.max_position_embeddings}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown: valid are {', '.join(OPTIMIZERS)}")
        if self.mean_semantics not in MEAN_SEMANTICS:
            raise ConfigError(f"mean semantics {self.mean_semantics!r} is unknown: valid are {', '.join(MEAN_SEMANTICS)}")
        if self.apply_rule not in APPLY_RULES:
            raise ConfigError(f"apply rule {self.apply_rule!r} is unknown: valid are {', '.join(APPLY_RULES)}")

    @property
    def modes(self) -> dict:
        """What receivers do with the payloads, as a run's record names it."""
        if self.optimizer != "Distro":   # nothing is exchanged: each client's own optimizer, or none
            return {"optimizer": self.optimizer}
        return {"mean_semantics": self.mean_semantics, "apply_rule": self.apply_rule,
                "weight_decay": self.distro.weight_decay, "zero_blocks": self.distro.zero_blocks}

    @property
    def client_batch(self) -> int:
        """Sequences one client trains per round: its share of the global batch (Psyche splits it)."""
        return max(1, self.global_batch_size // self.min_clients)

    def lr(self, step: int) -> float:
        """The rate of round `step`: the schedule, times the cold start's warmup factor."""
        return self.lr_schedule.lr(step) * cold_start_factor(step, self.cold_start_warmup_steps)

    def global_batch(self, step: int) -> int:
        """Sequences in round `step`'s global batch: Psyche's get_batch_size at the tokens the
        rounds before it consumed (its data index times the sequence length)."""
        return self.data_schedule(step)[1]

    def data_index(self, step: int) -> int:
        """The first sequence of round `step`: each round starts where the one before ended
        (Psyche's start_round_train adds the previous round's batch to its data index)."""
        return self.data_schedule(step)[0]

    def data_schedule(self, step: int) -> tuple[int, int]:
        """(data index, global batch) of round `step`."""
        end = self.global_batch_size_end or self.global_batch_size
        data_index = 0
        for round_ in range(step + 1):
            tokens = data_index * self.seq_len
            if tokens >= self.global_batch_size_warmup_tokens:
                # The ramp is over: tokens only grow, so every later batch is `end` too.
                return data_index + (step - round_) * end, end
            # Rust's f64::round: halves away from zero
            exact = self.global_batch_size + (end - self.global_batch_size) * (
                tokens / self.global_batch_size_warmup_tokens)
            batch = math.floor(exact + 0.5)
            if round_ == step:
                return data_index, batch
            data_index += batch
        raise AssertionError("unreachable")

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _check_count(name: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name} {value!r} is invalid: expected an integer >= {least}")


def resolve_config_path(path: str | Path) -> Path:
    """A config directory (or a run config's .toml file), given as a path or as a bare name
    of the bundled configs (sim/configs/)."""
    candidate = Path(path)
    if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".toml"):
        return candidate
    bundled = CONFIGS / str(path)
    if candidate.parent == Path(".") and bundled.is_dir():
        return bundled
    available = sorted(p.name for p in CONFIGS.iterdir() if (p / "state.toml").is_file())
    raise ConfigError(f"config path {str(path)!r} does not exist: give a directory holding state.toml and "
                      f"config.json, or one of the bundled configs: {', '.join(available)}")


def _section(table: dict, dotted: str, source: str) -> dict:
    node = table
    for key in dotted.split("."):
        node = node.get(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: [{dotted}] must be a table, got {node!r}")
    return node


def _build(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}: valid keys are {sorted(known)}")
    return cls(**values)


STALE_FLAG = "--accept-stale-config"


def load_config(path: str | Path = DEFAULT_CONFIG, *, data_location: str | None = None,
                model_config: str | Path | None = None, accept_stale: bool = False) -> RunConfig:
    """Load and validate <config>/state.toml + config.json (or a run config .toml file
    with config.json beside it). `data_location` ("dummy" or a file) replaces the config's
    data, `model_config` its config.json; `accept_stale` runs a file Psyche refuses. The run
    records all three."""
    state_path = resolve_config_path(path)
    if state_path.is_dir():
        state_path = state_path / "state.toml"
        if not state_path.is_file():
            raise ConfigError(f"config directory {str(state_path.parent)!r} has no state.toml: a config is a "
                              f"directory with state.toml and config.json")
    directory = state_path.parent
    try:
        state = tomllib.loads(state_path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{state_path}: not valid TOML ({err})") from None
    source = str(state_path)
    verdict = psyche_verdict(state)
    if verdict.refused and not accept_stale:
        raise ConfigError(f"{source}: Psyche at HEAD refuses it: {'; '.join(verdict.refused)}. Run it anyway with "
                          f"{STALE_FLAG} (the run records why)")
    run, llm = _section(state, "config", source), _section(state, "model.LLM", source)
    checkpoint, local = checkpoint_form(llm.get("checkpoint"), source)
    hf_path = model_config_path(directory, model_config, checkpoint, local, state_path)
    try:
        hf = json.loads(hf_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{hf_path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{hf_path}: expected a JSON object, got {type(hf).__name__}")

    model = ModelConfig.from_hf_dict(hf, source=str(hf_path))
    architecture = llm.get("architecture")
    # --model-config substitutes the model, its architecture included (the run records it).
    if architecture is not None and ARCHITECTURES.get(architecture) != model.style and model_config is None:
        raise ConfigError(f"{state_path}: architecture {architecture!r} contradicts config.json model_type "
                          f"{model.style!r}: valid pairs are {ARCHITECTURES}")
    if "max_seq_len" not in llm or "total_steps" not in run or "global_batch_size_start" not in run:
        raise ConfigError(f"{state_path}: needs model.LLM.max_seq_len, config.total_steps and "
                          f"config.global_batch_size_start")
    schedule = variant(llm.get("lr_schedule"), "lr_schedule", tuple(SCHEDULES), source)
    optimizer = variant(llm.get("optimizer"), "optimizer", OPTIMIZERS, source, units=("Dummy",)) or ("Distro", {})
    distro_table = optimizer[1] if optimizer[0] == "Distro" else {}
    missing = sorted({"betas", "weight_decay", "eps"} - set(optimizer[1])) if optimizer[0] == "AdamW" else []
    if missing:   # Psyche's AdamW has no defaults for these
        raise ConfigError(f"{source}: [model.LLM.optimizer.AdamW] needs {', '.join(missing)}")
    data, data_label = read_data_location(llm.get("data_location", "Dummy"), source, directory)
    overrides = []
    if data_location is not None:
        data = data_override(data_location)
        overrides.append(("data_location", data_label, data))
    if model_config is not None:
        beside = directory / "config.json"
        said = str(beside) if beside.is_file() else f"{architecture or 'model'} from checkpoint {checkpoint}"
        overrides.append(("model_config", said, str(hf_path)))
    modes = _modes(_section(state, "matsim", source), source)
    if "zero_blocks" in distro_table:
        raise ConfigError(f"{source}: zero_blocks is matsim's key, not Psyche's: set it under [matsim]")
    distro = _build(DistroConfig, {**distro_table, **({"zero_blocks": modes.pop("zero_blocks")}
                                                       if "zero_blocks" in modes else {})},
                    f"{state_path} [optimizer.Distro]")
    return RunConfig(
        name=state.get("run_id") or (directory.name if state_path.name == "state.toml" else state_path.stem),
        model=model,
        seq_len=llm["max_seq_len"],
        global_batch_size=run["global_batch_size_start"],
        global_batch_size_end=run.get("global_batch_size_end"),
        global_batch_size_warmup_tokens=run.get("global_batch_size_warmup_tokens", 0),
        cold_start_warmup_steps=llm.get("cold_start_warmup_steps", 0),
        total_steps=run["total_steps"],
        min_clients=run.get("min_clients", 1),
        max_round_train_time=run.get("max_round_train_time", 30.0),
        round_witness_time=run.get("round_witness_time", 0.0),
        data=data, data_location=data_label,
        checkpoint=checkpoint,
        lr_schedule=_build(SCHEDULES[schedule[0]], schedule[1], f"{state_path} [lr_schedule.{schedule[0]}]")
        if schedule else CosineSchedule(),
        optimizer=optimizer[0],
        distro=distro,
        adamw=_build(AdamWConfig, optimizer[1], f"{state_path} [optimizer.AdamW]")
        if optimizer[0] == "AdamW" else AdamWConfig(),
        markov=_build(MarkovSpec, _section(state, "matsim.data", source), f"{state_path} [matsim.data]"),
        **modes,
        overrides=tuple(overrides),
        ignored=verdict.ignored,
        refused=verdict.refused,
        path=directory,
    )


def _modes(table: dict, source: str) -> dict:
    """[matsim] mean_semantics and apply_rule (and the [matsim.data] table, read on its own)."""
    unknown = sorted(set(table) - {"data", *MODES})
    if unknown:
        raise ConfigError(f"{source}: [matsim] has unknown keys {unknown}: valid are data, "
                          + ", ".join(f"{key} ({', '.join(valid)})" for key, valid in MODES.items()))
    for key, valid in MODES.items():
        if key in table and table[key] not in valid:
            raise ConfigError(f"{source}: [matsim] {key} = {table[key]!r} is unknown: valid are {', '.join(valid)}")
    return {key: table[key] for key in MODES if key in table}


# [matsim]'s mode keys (and the testnet's flags), with their values.
MODES = {"mean_semantics": MEAN_SEMANTICS, "apply_rule": APPLY_RULES, "zero_blocks": ZERO_BLOCKS}
