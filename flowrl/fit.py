"""``flowrl fit``: a LightningCLI in subclass mode, ``model: {class_path: flowrl.algorithms.NFT, init_args: ...}``,
plus the one alias table that turns the seed's flat names into that form as each config is loaded.

The seed's names (the guide users migrate from) keep working: ``trainer_type`` chooses the algorithm class,
``dynamics_type`` and ``noise_level`` the ``dynamics`` component, ``train_steps``, ``num_train_steps`` and the
MixGRPO window the ``step_selection`` component, ``advantage_aggregation`` the ``advantage_estimator``. They are
translated in config files (a jsonargparse loader) and as ``--model.<name>`` / ``--trainer_type`` flags; every
other option is jsonargparse's to check, so an option that belongs to another component is refused by the parser
itself, and :func:`explain` turns its message into one line naming the option's owners.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from collections.abc import Sequence

import lightning as L
import yaml
from jsonargparse import set_loader
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from flowrl.algorithms import ALGORITHMS, FlowRLModule
from flowrl.checkpoint import check_algorithm, check_checkpoint_files, check_resume
from flowrl.data import PromptDataModule
from flowrl.dynamics import DYNAMICS, TrainSteps
from flowrl.errors import ConfigError
from flowrl.policy.sharding import check_sharding
from flowrl.precision import ENV as PRECISION_ENV
from flowrl.precision import measure_precision, needs_choice

__all__ = ["FlowRLCLI", "expand_config_bases", "explain", "fit_main", "translate_argv", "translate_config"]

# ---------------------------------------------------------------------------------------------- the alias table
#: the seed's names of the algorithms and dynamics (the classes' own tables) -> their class_path
TRAINER_TYPES = {name: f"flowrl.algorithms.{cls.__name__}" for name, cls in ALGORITHMS.items()}
DYNAMICS_TYPES = {name: f"flowrl.dynamics.{cls.__name__}" for name, cls in DYNAMICS.items()}
STEP_SELECTION = f"flowrl.dynamics.{TrainSteps.__name__}"
ADVANTAGE_AGGREGATIONS = {"sum": "group", "gdpo": "gdpo"}
#: flat model option -> (component option, its class_path, the init arg)
COMPONENT_OPTIONS = {
    "noise_level": ("dynamics", None, "noise_level"),
    **{name: ("step_selection", STEP_SELECTION, name)
       for name in ("train_steps", "num_train_steps", "window_size", "window_shift_interval", "window_stride")},
}
DEFAULT_TRAINER_TYPE = "grpo"


def _choice(table: dict, option: str, value):
    if value not in table:
        raise ConfigError(f"{option} {value!r} is unknown; choose one of {', '.join(map(str, table))}")
    return table[value]


def translate_config(doc):
    """A loaded config document in class_path form (documents without the seed's names come back unchanged)."""
    if not isinstance(doc, dict):
        return doc
    doc = dict(doc)
    trainer_type = doc.pop("trainer_type", None)
    model = doc.get("model")
    if trainer_type is None and not isinstance(model, dict):
        return doc
    model = dict(model or {})
    wrapped = "class_path" in model or "init_args" in model
    init = dict(model.get("init_args") or {}) if wrapped else model
    if trainer_type is not None:
        model = {"class_path": _choice(TRAINER_TYPES, "trainer_type", trainer_type)}
        wrapped = True
    if "advantage_aggregation" in init:
        init["advantage_estimator"] = _choice(ADVANTAGE_AGGREGATIONS, "advantage_aggregation",
                                              init.pop("advantage_aggregation"))
    dynamics_type = init.pop("dynamics_type", None)
    flat = {name: init.pop(name) for name in list(init) if name in COMPONENT_OPTIONS}
    if dynamics_type is not None or flat.get("noise_level") is not None:
        # the seed's default dynamics_type is Flow-SDE
        path = _choice(DYNAMICS_TYPES, "dynamics_type", dynamics_type or "Flow-SDE")
        args = {} if flat.get("noise_level") is None else {"noise_level": flat["noise_level"]}
        init["dynamics"] = {"class_path": path, **({"init_args": args} if args else {})}
    selection = {name: value for name, value in flat.items() if name != "noise_level" and value is not None}
    if selection:
        init["step_selection"] = {"class_path": STEP_SELECTION, "init_args": selection}
    if wrapped:
        model["init_args"] = init
        doc["model"] = model
    else:
        doc["model"] = init
    return doc


def _flowrl_loader(text: str):
    return translate_config(yaml.safe_load(text))


set_loader("flowrl", _flowrl_loader, exceptions=(yaml.YAMLError,))


class _NoAdvert(logging.Filter):
    """Lightning's tip to install its cloud logger, printed at every start: not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


def translate_argv(args: Sequence[str]) -> list[str]:
    """``--trainer_type X`` and ``--model.<seed name>=V`` flags in class_path form (the alias table again)."""
    out: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        a = items[i]
        name, value, used = None, None, 1
        for flag in ("--trainer_type", "--model.dynamics_type", "--model.advantage_aggregation",
                     *(f"--model.{n}" for n in COMPONENT_OPTIONS)):
            if a == flag and i + 1 < len(items):
                name, value, used = flag, items[i + 1], 2
            elif a.startswith(flag + "="):
                name, value = flag, a.split("=", 1)[1]
        i += used
        if name is None:
            out.append(a)
        elif name == "--trainer_type":
            out.append(f"--model={_choice(TRAINER_TYPES, 'trainer_type', value)}")
        elif name == "--model.dynamics_type":
            out.append(f"--model.dynamics={_choice(DYNAMICS_TYPES, 'dynamics_type', value)}")
        elif name == "--model.advantage_aggregation":
            out.append(f"--model.advantage_estimator={_choice(ADVANTAGE_AGGREGATIONS, 'advantage_aggregation', value)}")
        else:
            option = name[len("--model."):]
            component, class_path, arg = COMPONENT_OPTIONS[option]
            if class_path is not None:
                out.append(f"--model.{component}={class_path}")
            out.append(f"--model.{component}.{arg}={value}")
    return out


# ---------------------------------------------------------------------------------------------- base: chains
def expand_config_bases(args: Sequence[str]) -> list[str]:
    """Each ``--config FILE`` whose YAML names ``base: OTHER`` (a path relative to FILE, or a list of them read in
    order) becomes ``--config OTHER --config <FILE's other keys>``, recursively: LightningCLI merges several ``--config`` files in order (a later
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
    bases, name = data.pop("base"), config if is_file else "an inline --config"
    chain = []
    for base in bases if isinstance(bases, list) else [bases]:  # several bases: read in order (a model, an algorithm)
        # a file's base is relative to it; inline YAML's to the working directory (or absolute)
        path = os.path.normpath(os.path.join(os.path.dirname(config) if is_file else "", str(base)))
        if not os.path.isfile(path):
            raise ConfigError(f"{name}: its base {base!r} ({path}) does not exist; base is relative to the file naming it")
        if os.path.abspath(path) in seen or (is_file and os.path.abspath(path) == os.path.abspath(config)):
            raise ConfigError(f"{name}: base {base!r} leads back to itself")
        chain += _config_chain(path, (*seen, os.path.abspath(config)))
    return [*chain, yaml.safe_dump(data, sort_keys=False)]


# ---------------------------------------------------------------------------------------------- errors
def options_of(cls) -> set[str]:
    """The ``__init__`` options of ``cls``, following ``**kwargs`` to the parents (as jsonargparse does), less those
    a class fixes for its parent (``fixed_options``: jsonargparse reads them from the ``super().__init__`` call)."""
    names: set[str] = set()
    fixed = {o for klass in cls.__mro__ for o in getattr(klass, "fixed_options", ())}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - fixed


def _owners(option: str) -> list[str]:
    owners = [f"model: {TRAINER_TYPES[name]} (trainer_type {name})"
              for name, cls in ALGORITHMS.items() if option in options_of(cls)]
    owners += [f"model.dynamics: {DYNAMICS_TYPES[name]}" for name, cls in DYNAMICS.items() if option in options_of(cls)]
    owners += [f"model.step_selection: {STEP_SELECTION}"] if option in options_of(TrainSteps) else []
    return owners


def _reason(error: BaseException) -> str:
    """jsonargparse wraps what a constructor raised in its own (multi-line) error: the deepest ConfigError (or a
    missing file) is the reason; else its own message, made one line by :func:`explain`."""
    chain, cause = [], error
    while cause is not None and len(chain) < 50:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    reason = next((c for c in reversed(chain) if isinstance(c, (ConfigError, FileNotFoundError))), None)
    if reason is None and len(chain) > 1 and "Option '" not in str(error):
        reason = chain[-1]  # what a constructor (e.g. a callback's) raised
    return str(reason) if reason is not None else explain(str(error))


def explain(message: str) -> str:
    """jsonargparse's (nested, multi-line) parse error as one line: for an option the chosen class does not take,
    which component it belongs to and the fix."""
    refused = list(re.finditer(r"Option '([^']+)' is not accepted", message))
    if refused:
        option = refused[-1].group(1)
        before = message[:refused[-1].start()]
        class_path = (re.findall(r"class_path '([^']+)'", before) or ["?"])[-1]
        keys = re.findall(r'Parser key "([^"]+)"', before)
        where = "model" + "".join(f".{k}" for k in keys if k != "model")
        owners = _owners(option)
        hint = (f"it is an option of {'; '.join(owners)}" if owners else "no flowrl component has it (a typo?)")
        return f"{where}.{option} does nothing for {class_path}: {hint}. Remove it, or choose that component"
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Subtypes:", "Errors:", "- Expected a <class 'NoneType'>",
                                                       "Given value", "Does not validate against any"))]
    return " ".join(useful[-3:] if len(useful) > 3 else useful)


# ---------------------------------------------------------------------------------------------- the CLI
DEFAULT_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger")
TRAINER_DEFAULTS = {
    "use_distributed_sampler": False,  # flowrl's group sampler shards whole groups itself
    "log_every_n_steps": 1,
    "enable_model_summary": False,  # its FLOPs column is 0 for a pipeline; the module logs one line of its own
    # under runs/lightning_logs, or under <default_root_dir>/logs where the config sets default_root_dir
    "logger": [{"class_path": path, "init_args": {"save_dir": "runs"}} for path in DEFAULT_LOGGERS],
}


_SPECIAL_CKPT = ("last", "best", "hpc", "registry")  # Lightning finds these itself


def _one_version_folder(loggers) -> None:
    """The default CSV and TensorBoard loggers would each take the next free ``version_N`` (the CSV log in
    version_0, TensorBoard's in version_1): TensorBoard's goes into the CSV log's folder, under ``tensorboard/``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = next((lg for lg in loggers if type(lg) is CSVLogger), None)
    for tb in [lg for lg in loggers if type(lg) is TensorBoardLogger] if csv is not None else []:
        if (tb.root_dir, tb._version, tb._sub_dir) == (csv.root_dir, None, None):
            tb._version, tb._sub_dir = csv.version, "tensorboard"


class FlowRLCLI(LightningCLI):
    def init_parser(self, **kwargs):
        kwargs.setdefault("parser_mode", "flowrl")  # the alias table applies to every loaded config
        kwargs.setdefault("exit_on_error", False)  # errors become one ``error:`` line (:func:`explain`)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": TRAINER_TYPES[DEFAULT_TRAINER_TYPE]}})
        # the data class by class_path too (PromptDataModule unless a config names another, e.g. offline DPO's
        # flowrl.preference_data.PreferenceDataModule); a config's flat ``data:`` keys are its init args
        parser.set_defaults({"data": {"class_path": f"{PromptDataModule.__module__}.{PromptDataModule.__name__}"}})
        parser.link_arguments("model.init_args.group_size", "data.init_args.group_size")

    def before_instantiate_classes(self) -> None:
        """An unset ``trainer.precision`` on a CPU run is noted, to be measured once the module is built
        (:meth:`instantiate_trainer`); the default loggers write under ``trainer.default_root_dir``
        (``<root>/logs/version_N``), so a config names its run's folder once. Both are written into the run's saved
        config.yaml."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root, loggers = config.trainer.default_root_dir, config.trainer.logger
        for logger in loggers if root and isinstance(loggers, list) else []:
            args = getattr(logger, "init_args", None)
            if (getattr(logger, "class_path", None) in DEFAULT_LOGGERS and args is not None
                    and (args.save_dir, args.name) == ("runs", "lightning_logs")):
                args.save_dir, args.name = root, "logs"
        self._choose_precision = needs_choice(config.trainer.precision, config.trainer.accelerator)

    def instantiate_trainer(self, **kwargs):
        """An unset ``trainer.precision`` on a CPU run becomes the faster of float32 and bf16 autocast for this
        run's denoiser on this CPU (:mod:`flowrl.precision`, timed once the module is built), logged and written
        into the run's saved config.yaml."""
        if getattr(self, "_choose_precision", False) and hasattr(self.model, "policy"):
            config = self.config[self.subcommand] if self.subcommand else self.config
            choice = measure_precision(self.model.policy, self.model.train_batch_size, self.model.height,
                                       self.model.width)
            config.trainer.precision = choice.chosen
            init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            init.trainer.precision = choice.chosen
            devices, nodes = config.trainer.devices, config.trainer.num_nodes or 1
            if nodes > 1 or (isinstance(devices, int) and devices > 1) or isinstance(devices, list) and len(devices) > 1:
                os.environ[PRECISION_ENV] = choice.chosen  # the run's other processes start from this environment
            rank_zero_info(choice.line())
        trainer = super().instantiate_trainer(**kwargs)
        _one_version_folder(trainer.loggers)
        if hasattr(self.model, "policy"):
            check_sharding(self.model.policy, trainer.strategy)  # before any process starts
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a ``--ckpt_path`` file's hyper-parameters into the config here, before any class is built:
        a checkpoint that cannot be read, or one another algorithm wrote, is refused first, in one line."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in _SPECIAL_CKPT:
            check_checkpoint_files(ckpt)
            model = self.config[sub].get("model")
            if getattr(model, "class_path", None):
                check_algorithm(ckpt, model.class_path.rpartition(".")[2])
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """A ``--ckpt_path`` that cannot resume this run (truncated, another model, algorithm or number of
        processes) is refused in one line before any work (:func:`flowrl.checkpoint.check_resume`)."""
        ckpt = (self.config[self.subcommand] if self.subcommand else self.config).get("ckpt_path")
        if ckpt and ckpt not in _SPECIAL_CKPT and hasattr(self.model, "policy"):
            check_resume(ckpt, self.model, self.trainer.num_nodes * self.trainer.num_devices)

    def instantiate_classes(self) -> None:
        """Errors raised while the configured classes are built are configuration errors (no work started)."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(_reason(e)) from e


def fit_main(args: Sequence[str], run: bool = True) -> FlowRLCLI:
    """``flowrl fit ...`` (``run=False``: parse and build the classes only, no subcommand)."""
    from jsonargparse import ArgumentError

    argv = translate_argv(expand_config_bases(list(args)))
    try:
        with warnings.catch_warnings():
            # flowrl's own command passes its command line as ``args`` (after the aliases): not the mistake
            # LightningCLI warns about when a script mixes both
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            # Lightning 2.6's own use of a torch.utils._pytree name torch 2.13 deprecates: nothing a user can change
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            # the same for its all_gather (several processes): torch 2.13 deprecates the function Lightning calls
            warnings.filterwarnings("ignore", message=r"torch.distributed.nn.functional.all_gather is deprecated")
            return FlowRLCLI(FlowRLModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                             args=argv, run=run,
                             trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                             parser_kwargs={"default_env": False})
    except ArgumentError as e:
        raise ConfigError(_reason(e)) from e
