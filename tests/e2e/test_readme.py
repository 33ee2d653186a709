"""The README and the documents under docs/ are run, not just read: every code block executes, every test they name
exists, every file and picture they link is in the repo, the migration table matches the code, and the README stays
a user's document of at most 200 lines."""

import ast
import glob
import inspect
import os
import re
import shlex

import pytest
import yaml
from test_cli import tiny_overrides

from flowrl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = "bash scripts/setup.sh && "
#: generated from the classes (``python -m flowrl.config_reference``): no code blocks of its own to run
GENERATED = {os.path.join("docs", "configuration.md")}
#: every user document, by its path relative to the repository root: the README first, then docs/ (any depth)
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(path, ROOT)
                                   for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
TEXT = {doc: open(os.path.join(ROOT, doc), encoding="utf-8").read() for doc in DOCUMENTS}
README = TEXT["README.md"]
MIGRATION = os.path.join("docs", "migration.md")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block of a markdown text."""
    return re.findall(r"^ *```(\w+)\n(.*?)^ *```", text, re.S | re.M)


#: the documents whose code blocks run, and their blocks
BLOCKS = {doc: code_blocks(TEXT[doc]) for doc in DOCUMENTS if doc not in GENERATED}


def dedent(code: str) -> str:
    """A block inside a list item is indented as the item's text."""
    lines = code.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines) + "\n"


def blocks(lang: str, doc: str = "README.md") -> list[str]:
    """The blocks of language ``lang`` in one document."""
    return [dedent(code) for kind, code in BLOCKS[doc] if kind == lang]


def every_block(lang: str) -> list[tuple[str, int, str]]:
    """``(document, index, code)`` of every block of language ``lang`` in every document."""
    return [(doc, index, code) for doc in BLOCKS for index, code in enumerate(blocks(lang, doc))]


def block_id(block) -> str:
    return f"{block[0]}-{block[1]}"


def test_the_readme_is_at_most_200_lines():
    """A user's document: reference material lives under docs/ and the README links it."""
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material into docs/"
    assert README.count("\n") <= 200  # what wc -l counts


def test_the_readme_links_every_document():
    linked = {os.path.normpath(link) for link in re.findall(r"\]\(((?!http|#)[^)]+)\)", README)}
    missing = [doc for doc in DOCUMENTS[1:] if os.path.normpath(doc) not in linked]
    assert not missing, f"documents the README does not link: {missing}"
    assert len(DOCUMENTS) > 1 and MIGRATION in DOCUMENTS


def test_the_documents_have_their_code_blocks():
    for doc, found in BLOCKS.items():
        kinds = {kind for kind, _ in found}
        assert kinds <= {"bash", "python", "yaml"}, f"{doc}: a block of a language this test cannot run: {kinds}"
    assert len(blocks("bash")) >= 3 and len(blocks("python")) >= 4 and every_block("yaml")


@pytest.fixture
def in_a_user_checkout(tmp_path, monkeypatch):
    """A working directory where the README's relative paths (lightning_configs/, examples/) resolve."""
    for name in ("lightning_configs", "examples", "scripts"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    return tmp_path


@pytest.mark.parametrize("block", every_block("python"), ids=block_id)
def test_python_block_runs(block, in_a_user_checkout):
    """Executed as a script of its own would be (``__name__ == "__main__"``); a reward it registers is
    unregistered afterwards."""
    from flowrl.rewards import registry

    doc, index, code = block
    registry._import_builtins()
    registered = dict(registry._REGISTRY)
    try:
        exec(compile(code, f"{doc} python block {index}", "exec"), {"__name__": "__main__"})
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(registered)


@pytest.mark.parametrize("block", every_block("yaml"), ids=block_id)
def test_yaml_block_is_a_valid_config_overlay(block, in_a_user_checkout):
    """A config fragment of a document, added after the main job's config, builds the model it describes."""
    _, _, code = block
    overlay = in_a_user_checkout / "overlay.yaml"
    overlay.write_text(code)
    cli = main(["--config", "lightning_configs/toy/nft.yaml", "--config", str(overlay), "--trainer.logger=false"],
               run=False)
    for key, value in yaml.safe_load(code)["model"].items():
        if key == "advantage_aggregation":  # the seed's name of the registered estimator
            from flowrl.advantages import ADVANTAGE_ESTIMATORS

            assert cli.model.advantage_estimator is ADVANTAGE_ESTIMATORS[{"sum": "group"}.get(value, value)]
        elif not isinstance(value, (list, dict)):
            assert getattr(cli.model, key) == value


def commands(doc: str = "README.md") -> list[str]:
    """The shell commands of a document's bash blocks (the README's by default), one per line, with the set-up
    prefix removed."""
    found = []
    for block in blocks("bash", doc):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line.removeprefix(SETUP))
    return found


def test_the_suite_command_is_what_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    suite = [c for c in commands() if "pytest" in c]
    assert suite == [".venv/bin/python -m pytest"]
    assert SETUP + suite[0] in ci


@pytest.mark.parametrize("doc", [doc for doc in BLOCKS if blocks("bash", doc)])
def test_every_file_a_shell_command_names_exists(doc):
    """The configs, examples and scripts a document's commands name are in the repo (the README's also run, in
    order, below; what a command writes, under runs/, is not checked here)."""
    named = [word for block in blocks("bash", doc) for word in re.split(r"[\s=]+", block)
             if re.match(r"(lightning_configs|examples|scripts|benchmarks)/\S+\.\w+$", word)]
    assert not [path for path in named if not os.path.isfile(os.path.join(ROOT, path))]
    if doc == "README.md":
        assert "lightning_configs/toy/nft.yaml" in named and "scripts/setup.sh" in named


def test_the_flowrl_commands_run_in_order(in_a_user_checkout, prompt_file, capsys):
    """The README's flowrl commands, one after the other in one checkout (each fit shrunk to two iterations): the
    main job, then the LoRA run, its export and the grid of the exported LoRA in a stock pipeline."""
    ran = []
    for command in commands():
        argv = shlex.split(command)
        if argv[0] != ".venv/bin/flowrl":
            continue
        args = argv[1:]
        if args[0] == "fit":
            config = args[args.index("--config") + 1]
            args += tiny_overrides(os.path.join(ROOT, config), None, prompt_file)
        main(args)
        ran.append(args[0])
    assert ran == ["fit", "fit", "export", "sample"]
    out = capsys.readouterr().out
    assert "exported LoRA" in out and "mean reward" in out
    assert (in_a_user_checkout / "runs" / "toy-lora" / "samples" / "grid.png").is_file()
    assert (in_a_user_checkout / "runs" / "toy-nft" / "logs" / "version_0" / "curves.png").is_file()


def test_every_test_the_documents_name_exists():
    named = {(doc, path, function) for doc in DOCUMENTS
             for path, function in re.findall(r"(test_\w+\.py)(?:::(\w+))?", TEXT[doc])}
    assert len({(path, function) for _, path, function in named}) > 40
    missing = []
    files = {os.path.basename(p): p for p in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)}
    for doc, path, function in named:
        full = files.get(path, os.path.join(ROOT, "tests", path))
        if not os.path.isfile(full):
            missing.append(f"{doc}: {path}")
        elif function:
            tree = ast.parse(open(full, encoding="utf-8").read())
            if function not in {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}:
                missing.append(f"{doc}: {path}::{function}")
    assert not missing, f"the documents name tests that do not exist: {sorted(missing)}"


def test_every_picture_and_file_the_documents_link_exists():
    """In the README and in every document under docs/, a link is relative to the document's own folder."""
    links = {doc: re.findall(r"\]\(((?!http|#)[^)]+)\)", TEXT[doc]) for doc in DOCUMENTS}
    assert links["README.md"] and links[MIGRATION]
    broken = [f"{doc}: {link}" for doc, found in links.items() for link in found
              if not os.path.exists(os.path.join(ROOT, os.path.dirname(doc), link))]
    assert not broken, f"links to files that do not exist: {broken}"


# -------------------------------------------------------------------------------------------- the migration table
def migration_rows() -> list[tuple[str, str, str]]:
    """The rows of the option table of docs/migration.md."""
    section = TEXT[MIGRATION].split("# Coming from Flow-Factory", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    return [tuple(row) for row in rows]


def effective_default(cls, name):
    """The default of option ``name`` for class ``cls``: the first ``__init__`` along the MRO that declares it."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return inspect.signature(init).parameters[name].default
    raise AssertionError(f"{cls.__name__} has no option {name}")


def code(cell: str):
    return yaml.safe_load(cell.strip("`"))


#: every option the Flow-Factory user guide (``../shared/seed/``, not part of this repository) configures in its
#: ``train:`` / ``eval:`` / ``scheduler:`` examples or names in its text
GUIDE_OPTIONS = {
    "trainer_type", "dynamics_type", "train_steps", "num_train_steps", "resolution", "eval.resolution", "kl_type",
    "kl_beta", "ref_param_device", "num_train_timesteps", "time_sampling_strategy", "time_shift",
    "timestep_fraction", "off_policy", "ema_decay_schedule", "ema_decay", "ema_update_interval", "ema_device",
    "flat_steps", "ramp_rate", "ema_kl_beta", "clip_range", "adv_clip_range", "awm_weighting", "ghuber_power",
}


def test_migration_table_covers_every_option_the_guide_names():
    options = {row[0].strip("`") for row in migration_rows()}
    assert GUIDE_OPTIONS <= options, f"not in the migration table: {sorted(GUIDE_OPTIONS - options)}"
    assert "advantage_aggregation" in options and "noise_level" in options


@pytest.mark.parametrize("row", migration_rows(), ids=lambda r: r[0].strip("`"))
def test_migration_row_matches_the_code(row):
    import callbacks
    import flowrl.dynamics
    from flowrl.algorithms import ALGORITHMS
    from flowrl.algorithms.base import EvalConfig
    from flowrl.fit import DEFAULT_TRAINER_TYPE
    from flowrl.fit import options_of as trainer_options

    _, where, default = row
    if where.startswith("`trainer_type`"):
        assert code(default) == DEFAULT_TRAINER_TYPE
        return
    component = re.fullmatch(r"`(callbacks|flowrl\.dynamics)\.(\w+)\((\w+)\)`", where)
    if component:
        owner = getattr(callbacks if component[1] == "callbacks" else flowrl.dynamics, component[2])
        assert effective_default(owner, component[3]) == code(default.split(" (")[0])
        return
    if where == "`model.dynamics`":  # the algorithm's default_dynamics(), by import path
        for part in default.split(";"):
            names, _, value = part.partition(":")
            for trainer in names.split(","):
                made = ALGORITHMS[trainer.strip()].default_dynamics(None)
                assert f"flowrl.dynamics.{type(made).__name__}" == code(value.strip()), trainer
        return
    option = re.match(r"`model\.([\w.]+)`", where)[1]
    default = default.split(" (")[0] if option == "advantage_estimator" else default
    if option == "eval.resolution":
        assert EvalConfig().resolution is None and default.startswith("`null`")
        return
    # "grpo, grpo-guard: `x`; awm: `y`", or one value for every trainer that has the option
    per_trainer = {}
    for part in default.split(";"):
        names, _, value = part.rpartition(":") if re.match(r"\s*[a-z-]+(, [a-z-]+)*: `", part) else ("", "", part)
        value = re.match(r"\s*(`[^`]*`)", value)[1]
        for trainer in (names.split(",") if names else ALGORITHMS):
            per_trainer[trainer.strip()] = code(value)
    users = [t for t, cls in ALGORITHMS.items() if option in trainer_options(cls)]
    assert set(per_trainer) >= set(users) and users
    for trainer in users:
        assert effective_default(ALGORITHMS[trainer], option) == per_trainer[trainer], trainer


def test_the_configuration_reference_is_generated_from_the_classes():
    from flowrl.config_reference import reference

    committed = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    assert committed == reference(), "docs/configuration.md is stale: python -m flowrl.config_reference > docs/configuration.md"
    assert "| `nft_beta` |" in committed and "| `ema_decay` |" in committed and "| `lora_rank` |" in committed
