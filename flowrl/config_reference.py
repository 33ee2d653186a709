"""The configuration reference, generated from the classes: ``python -m flowrl.config_reference > docs/configuration.md``.

The types, defaults and descriptions are the ones ``flowrl fit --help`` prints: jsonargparse reads them from the
signatures and the ``Args:`` sections of the docstrings, so the reference cannot drift from the code
(``tests/e2e/test_readme.py`` checks that the committed file is what this prints). Only the Markdown layout is ours.
"""

from __future__ import annotations

import inspect
import sys

from jsonargparse import ArgumentParser

__all__ = ["reference"]


def _options(cls) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` of every option of ``cls``, nested dataclasses flattened."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", sub_configs=True)
    rows = []
    for action in parser._actions:
        if not action.dest.startswith("x.") or action.dest.endswith(".help") or type(action).__name__ == "ActionConfigFile":
            continue
        if (action.help or "").strip() == "Path to a configuration file.":
            continue
        name = action.dest[2:]
        kind = getattr(action, "_typehint", None) or action.type
        kind = inspect.formatannotation(kind) if kind is not None else ("bool" if action.nargs == "?" else "")
        kind = kind.replace("NoneType", "None").replace("typing.", "").replace("collections.abc.", "")
        default = action.default
        default = "required" if action.required else ("null" if default is None else repr(default))
        rows.append((name, kind, default, " ".join((action.help or "").split())))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _table(rows) -> list[str]:
    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {_code(kind)} | {_code(default)} | {_cell(text)} |" for name, kind, default, text in rows]
    return lines


def reference() -> str:
    import callbacks
    from flowrl.algorithms import ALGORITHMS
    from flowrl.algorithms.base import EvalConfig
    from flowrl.data import PromptDataModule
    from flowrl.dynamics import CPS, ODE, DanceSDE, FlowSDE, TrainSteps
    from flowrl.fit import options_of as trainer_options
    from flowrl.policy import PolicyConfig
    from flowrl.rewards import RewardSpec

    per_trainer = {t: {row[0]: row for row in _options(cls) if "." not in row[0]} for t, cls in ALGORITHMS.items()}
    names = list(dict.fromkeys(n for rows in per_trainer.values() for n in rows))
    rows = []
    for name in names:
        users = [t for t, cls in ALGORITHMS.items() if name in trainer_options(cls)]
        if not users:
            continue
        defaults = {t: per_trainer[t][name][2] for t in users}
        if len(set(defaults.values())) == 1:
            default = next(iter(defaults.values()))
        else:  # e.g. dynamics_type: Flow-SDE for the coupled trainers, ODE for the decoupled ones
            by_value: dict[str, list[str]] = {}
            for t, d in defaults.items():
                by_value.setdefault(d, []).append(t)
            default = "; ".join(f"{', '.join(ts)}: {d}" for d, ts in by_value.items())
        first = per_trainer[users[0]][name]
        rows.append((name, first[1], default, first[3], ", ".join(users)))
    out = ["# Configuration reference", "",
           "Generated from the classes by `python -m flowrl.config_reference` (the same text `flowrl fit --help`",
           "prints); do not edit by hand. Every option is a key of the YAML config or a `--section.option=value`",
           "flag of `flowrl fit`.", "",
           "## `model`", "",
           "`model.class_path` picks the algorithm: `flowrl.algorithms.GRPO`, `GRPOGuard`, `NFT`, `AWM` (or a class of",
           "your own); the seed's `trainer_type` (`grpo`, `grpo-guard`, `nft`, `awm`; default `grpo`) is its alias. Its",
           "options go under `model.init_args`; an option the chosen class does not take is an error.", "",
           "| option | type | default | used by | description |", "|---|---|---|---|---|"]
    out += [f"| `{n}` | {_code(k)} | {_code(d)} | {u} | {_cell(text)} |" for n, k, d, text, u in rows]
    sections = [(f"`model.dynamics`: `flowrl.dynamics.{cls.__name__}`", cls) for cls in (FlowSDE, DanceSDE, CPS, ODE)]
    sections += [("`model.step_selection`: `flowrl.dynamics.TrainSteps`", TrainSteps), ("`model.policy`", PolicyConfig), ("`model.eval`", EvalConfig), ("`model.rewards[]` (each entry)", RewardSpec),
                ("`data`", PromptDataModule)]
    sections += [(f"`trainer.callbacks`: `callbacks.{name}`", getattr(callbacks, name))
                 for name in ("EMA", "OffPolicySampling", "ReferenceModel", "SamplePlots", "IterationTimes",
                              "RewardHackingGuard")]
    for title, cls in sections:
        out += ["", f"## {title}", ""] + _table(_options(cls))
    out += ["", "The `trainer` section is Lightning's `Trainer` (`flowrl fit --help` lists it); flowrl's defaults there:",
            "`use_distributed_sampler: false` (the group sampler shards whole groups), `log_every_n_steps: 1`, CSV and",
            "TensorBoard loggers under `runs/`, and on CPUs a `precision` chosen for the CPU when unset.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference())
