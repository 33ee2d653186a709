"""``flowrl fit --help`` documents every option of flowrl's classes: type, default and a description
(the descriptions come from the classes' docstrings, so code and reference cannot drift apart)."""

import re

import pytest

from flowrl.algorithms import ALGORITHMS
from flowrl.cli import main

OPTION = re.compile(r"^  (--[\w.]+)(.*)$")


def help_text(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def undocumented(text: str, prefixes: tuple[str, ...]) -> tuple[list[str], int]:
    """Options under ``prefixes`` whose help is only the ``(type: ..., default: ...)`` part, and how many were seen."""
    entries, current = {}, None
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            current = m.group(1)
            # The option's own metavar (and aliases) come first; the description starts after two spaces.
            rest = re.split(r"\s{2,}", m.group(2).strip(), maxsplit=1)
            entries[current] = rest[1] if len(rest) == 2 else ""
        elif current and line.startswith(" " * 20):
            entries[current] += " " + line.strip()
        else:
            current = None
    options = {k: v.strip() for k, v in entries.items() if k.startswith(prefixes) and not k.endswith(".help")}
    options = {k: v for k, v in options.items() if v != "Path to a configuration file."}
    return sorted(k for k, v in options.items() if not v or v.startswith("(")), len(options)


@pytest.mark.parametrize("trainer_type", sorted(ALGORITHMS))
def test_every_model_option_has_a_description(capsys, trainer_type):
    cls = ALGORITHMS[trainer_type]
    text = help_text(capsys, "--model.help", f"flowrl.algorithms.{cls.__name__}")
    missing, seen = undocumented(text, ("--model.",))
    assert seen > 25 and not missing, f"options without a description (add them to the class's Args:): {missing}"
    assert "(type: int, default: 8)" in text  # group_size: type and default are shown too


@pytest.mark.parametrize("component", ["flowrl.dynamics.FlowSDE", "flowrl.dynamics.DanceSDE", "flowrl.dynamics.CPS",
                                       "flowrl.dynamics.TrainSteps"])
def test_every_component_option_has_a_description(capsys, component):
    name = "step_selection" if component.endswith("TrainSteps") else "dynamics"
    text = help_text(capsys, f"--model.{name}.help", component)
    missing, seen = undocumented(text, (f"--{name}.",))
    assert seen >= 1 and not missing, f"{component}: options without a description: {missing}"


@pytest.mark.parametrize("data_class", ["flowrl.data.PromptDataModule", "flowrl.preference_data.PreferenceDataModule"])
def test_every_data_option_has_a_description(capsys, data_class):
    """The data class is chosen by class_path (prompts by default, preference pairs for offline DPO)."""
    text = help_text(capsys, "--data.help", data_class)
    missing, seen = undocumented(text, ("--data.",))
    assert seen > 5 and not missing, f"options without a description (add them to the class's Args:): {missing}"


@pytest.mark.parametrize("callback", ["callbacks.EMA", "callbacks.OffPolicySampling", "callbacks.ReferenceModel",
                                      "callbacks.SamplePlots", "callbacks.IterationTimes"])
def test_every_callback_option_has_a_description(capsys, callback):
    text = help_text(capsys, "--trainer.callbacks.help", callback)
    missing, seen = undocumented(text, ("--trainer.callbacks.",))
    assert seen >= 1 and not missing, f"{callback}: options without a description: {missing}"
