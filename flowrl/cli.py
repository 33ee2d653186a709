"""``flowrl fit --config lightning_configs/....yaml``: a LightningCLI whose model class is picked by
``trainer_type`` (grpo, grpo-guard, nft, awm), as in the configs users already have."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from flowrl.algorithms import ALGORITHMS
from flowrl.algorithms.options import refuse_options_of_other_trainers
from flowrl.data import PromptDataModule
from flowrl.errors import ConfigError
from flowrl.precision import resolve_precision

DEFAULT_TRAINER_TYPE = "grpo"

TRAINER_DEFAULTS = {
    "use_distributed_sampler": False,  # flowrl's group sampler shards whole groups itself
    "log_every_n_steps": 1,
    "logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
    ],
}


def _flag_value(args: Sequence[str], flag: str) -> list[str]:
    values = []
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
    return values


def _config_documents(args: Sequence[str]) -> list[dict]:
    """The mappings of the command line's ``--config`` files (or inline YAML), in order; unreadable ones skipped
    (jsonargparse reports those itself)."""
    documents = []
    args = expand_config_bases(args)
    for config in _flag_value(args, "--config") + _flag_value(args, "-c"):
        text = open(config, encoding="utf-8").read() if os.path.isfile(config) else config
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            documents.append(data)
    return documents


def expand_config_bases(args: Sequence[str]) -> list[str]:
    """Each ``--config FILE`` whose YAML names ``base: OTHER`` (a path relative to FILE) becomes ``--config OTHER
    --config <FILE's other keys>``, recursively: LightningCLI merges several ``--config`` files in order (a later
    value wins; a list is replaced, or extended by a ``key+:`` entry), so a config states only what differs from
    its base.

    Hand-written: jsonargparse merges the ``--config`` files a command line lists, but a file cannot name the one
    it extends. The ``base`` key is consumed here, so a printed or saved config is the merged whole."""
    expanded: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            expanded += [arg for config in _config_chain(args[i + 1], ()) for arg in (a, config)]
            i += 2
        elif a.startswith("--config="):
            expanded += [arg for config in _config_chain(a.split("=", 1)[1], ()) for arg in ("--config", config)]
            i += 1
        else:
            expanded.append(a)
            i += 1
    return expanded


def _config_chain(config: str, seen: tuple[str, ...]) -> list[str]:
    """``config`` preceded by its bases; a file that names a base is passed on as its other keys (inline YAML)."""
    is_file = os.path.isfile(config)
    try:
        data = yaml.safe_load(open(config, encoding="utf-8") if is_file else config)
    except (yaml.YAMLError, OSError):
        return [config]  # jsonargparse reports it
    if not isinstance(data, dict) or "base" not in data:
        return [config]
    base, name = data.pop("base"), config if is_file else "an inline --config"
    # a file's base is relative to it; inline YAML's to the working directory (or absolute)
    path = os.path.normpath(os.path.join(os.path.dirname(config) if is_file else "", str(base)))
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: its base {base!r} ({path}) does not exist; base is relative to the file naming it")
    if os.path.abspath(path) in seen or (is_file and os.path.abspath(path) == os.path.abspath(config)):
        raise ConfigError(f"{name}: base {base!r} leads back to itself")
    return [*_config_chain(path, (*seen, os.path.abspath(config))), yaml.safe_dump(data, sort_keys=False)]


def trainer_type_from_args(args: Sequence[str]) -> str:
    """``--trainer_type X`` wins; else the last ``--config`` that sets ``trainer_type``; else grpo."""
    explicit = _flag_value(args, "--trainer_type")
    found = explicit[-1] if explicit else None
    if found is None:
        for data in _config_documents(args):
            found = data.get("trainer_type", found)
    found = found or DEFAULT_TRAINER_TYPE
    if found not in ALGORITHMS:
        raise ConfigError(f"trainer_type {found!r} is unknown; choose one of {sorted(ALGORITHMS)}")
    return found


class FlowRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--trainer_type",
            choices=sorted(ALGORITHMS),
            default=DEFAULT_TRAINER_TYPE,
            help="The algorithm: grpo, grpo-guard, nft or awm (selects the model class).",
        )
        parser.link_arguments("model.group_size", "data.group_size")

    def before_instantiate_classes(self) -> None:
        """An unset ``trainer.precision`` on a CPU run becomes what the CPU computes natively (:mod:`flowrl.precision`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        chosen, why = resolve_precision(config.trainer.precision, config.trainer.accelerator)
        if why is not None:
            config.trainer.precision = chosen
            rank_zero_info(why)

    def instantiate_classes(self) -> None:
        """Errors raised while the configured classes are built are configuration errors (no work started)."""
        try:
            super().instantiate_classes()
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e


def model_keys_from_args(args: Sequence[str]) -> dict[str, object]:
    """The top-level ``model`` options a command line sets, in its ``--config`` files or as ``--model.X``, with
    their values (``...`` where not known before parsing). A saved ``config.yaml`` lists every option, another
    trainer's inherited ones as ``null``: that is "not set"."""
    keys: dict[str, object] = {}
    for data in _config_documents(args):
        model = data.get("model")
        if isinstance(model, dict):
            keys.update(model.get("init_args", model) if "class_path" in model else model)
    for i, a in enumerate(args):
        if a.startswith("--model.") and not a.startswith("--model.init_args."):
            name, sep, value = a[len("--model."):].partition("=")
            if "." in name:  # --model.policy.lora_rank: the option is policy
                keys[name.split(".", 1)[0]] = ...
                continue
            if not sep and i + 1 < len(args):
                value = args[i + 1]
            try:
                keys[name] = yaml.safe_load(value) if value else ...
            except yaml.YAMLError:
                keys[name] = ...
    return keys


def main(args: Sequence[str] | None = None, run: bool = True) -> FlowRLCLI:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:  # ``flowrl export``: not a Trainer subcommand (flowrl/export.py)
        from flowrl.export import export_main

        return export_main(argv[1:])
    if argv[:1] == ["sample"]:  # ``flowrl sample``: images, a grid and reward scores from a model (flowrl/sample.py)
        from flowrl.sample import sample_main

        return sample_main(argv[1:])
    if argv[:1] == ["serve-reward"]:  # ``flowrl serve-reward``: host a reward over HTTP (flowrl/rewards/remote.py)
        from flowrl.rewards.remote import serve_reward_main

        return serve_reward_main(argv[1:])
    argv = expand_config_bases(argv)
    trainer_type = trainer_type_from_args(argv)
    # An option of another trainer gets a message naming that trainer (jsonargparse would only say "unknown key").
    refuse_options_of_other_trainers(ALGORITHMS[trainer_type], model_keys_from_args(argv))
    return FlowRLCLI(
        ALGORITHMS[trainer_type],
        PromptDataModule,
        args=argv,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def console_main(args: Sequence[str] | None = None) -> None:
    """The ``flowrl`` command: exit status 0 on success, 2 with one ``error:`` line for a refused configuration.

    ``--debug`` (or ``FLOWRL_DEBUG=1``) shows the traceback of a refused configuration as well."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("FLOWRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except ConfigError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console_main()
