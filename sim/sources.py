"""Where a run's data and its model's config.json come from: Psyche's data_location and
checkpoint forms, which of them this machine can read, and the flags that substitute for
the rest (--data-location, --model-config)."""
import json
from pathlib import Path

from sim.errors import ConfigError


def variant(value, key: str, allowed: tuple[str, ...], source: str, units: tuple[str, ...] = ()
             ) -> tuple[str, object] | None:
    """Psyche's enums in TOML: a unit variant (one of `units`) is a string (optimizer =
    "Dummy"), any other a table with one key ([model.LLM.optimizer.Distro], data_location =
    { Server = "..." })."""
    if value is None:
        return None
    if isinstance(value, str) and value in units:
        return value, {}
    if isinstance(value, str) and value in allowed:
        raise ConfigError(f"{source}: model.LLM.{key} = {value!r} names a variant with fields: write it as a "
                          f"table, [model.LLM.{key}.{value}]")
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in allowed:
        return next(iter(value.items()))
    raise ConfigError(f"{source}: model.LLM.{key} {value!r} is unknown: valid are {', '.join(allowed)}")


DATA_LOCATIONS = ("Dummy", "Local", "Server", "Http", "WeightedHttp", "Preprocessed")
CHECKPOINTS = ("Hub", "Dummy", "Ephemeral", "P2P")
DATA_FLAG = "--data-location dummy|PATH"
MODEL_FLAG = "--model-config PATH"


def read_data_location(value, source: str, directory: Path) -> tuple[str | None, str]:
    """(what the run reads, the config's form as a label): Dummy and existing Local paths are
    read here; the other forms are data matsim cannot reach (the run then needs DATA_FLAG)."""
    kind, detail = variant(value, "data_location", DATA_LOCATIONS, source, units=("Dummy",))
    if kind == "Dummy":
        return "Dummy", "Dummy"
    if kind == "Http":
        if not isinstance(detail, dict) or not {"location", "token_size_in_bytes", "shuffle"} <= set(detail):
            raise ConfigError(f"{source}: model.LLM.data_location.Http needs location, token_size_in_bytes and "
                              f"shuffle, got {detail!r}")
        where = variant(detail["location"], "data_location.Http.location", ("SingleUrl", "NumberedFiles", "Gcp"),
                         source)
        return None, f"Http {where[0]} {json.dumps(where[1], sort_keys=True)}"
    if not isinstance(detail, str) or not detail:
        raise ConfigError(f"{source}: model.LLM.data_location.{kind} {detail!r} is invalid: expected a non-empty "
                          f"string")
    label = f"{kind} {detail}"
    # A Local path as Psyche reads it (from where the run starts), else beside state.toml.
    for candidate in (Path(detail), directory / detail) if kind == "Local" else ():
        if candidate.is_file():
            return str(candidate), label
    return None, label


def remote_data_error(config) -> ConfigError:
    """A run (sim.config.RunConfig) whose data this machine cannot read."""
    return ConfigError(f"model.LLM.data_location is {config.data_location}, which matsim cannot read on this machine "
                       f"(remote, or not a local file): run with {DATA_FLAG} (the synthetic source, or a local byte "
                       f"corpus); the run records the substitution")


def checkpoint_form(value, source: str) -> tuple[str, Path | None]:
    """(the checkpoint form as a label, a local directory it names, if any)."""
    if value is None:
        return "Dummy", None
    kind, detail = variant(value, "checkpoint", CHECKPOINTS, source, units=("Ephemeral",))
    if kind == "Ephemeral":
        return kind, None
    key = "repo_id"
    if not isinstance(detail, dict) or not isinstance(detail.get(key), str):
        raise ConfigError(f"{source}: model.LLM.checkpoint.{kind} needs {key} (a string), got {detail!r}")
    if kind != "Dummy" and not detail[key]:   # Psyche's Model::check: an empty repo is a bad checkpoint
        raise ConfigError(f"{source}: model.LLM.checkpoint.{kind} {key} is empty: name a repository")
    local = Path(detail[key]) if key == "repo_id" and detail[key] and Path(detail[key]).is_dir() else None
    return f"{kind} {detail[key]}" if detail[key] else kind, local


def model_config_path(directory: Path, model_config: str | Path | None, checkpoint: str, local: Path | None,
                  state_path: Path) -> Path:
    """Where the model's config.json comes from: --model-config, else beside state.toml, else
    in the checkpoint's local directory."""
    if model_config is not None:
        given = Path(model_config)
        found = given / "config.json" if given.is_dir() else given
        if not found.is_file():
            raise ConfigError(f"--model-config {str(model_config)!r} is not a config.json file or a directory "
                              f"holding one")
        return found
    for candidate in (directory / "config.json", local / "config.json" if local else None):
        if candidate is not None and candidate.is_file():
            return candidate
    raise ConfigError(f"{state_path}: the model's config.json is neither beside it nor in model.LLM.checkpoint "
                      f"({checkpoint}; matsim fetches nothing from a hub): give it with {MODEL_FLAG}")


def data_override(value: str) -> str:
    if value.lower() == "dummy":
        return "Dummy"
    if not Path(value).is_file():
        raise ConfigError(f"--data-location {value!r} is neither dummy nor a local file: give dummy (the synthetic "
                          f"source) or the path of a byte corpus")
    return value
