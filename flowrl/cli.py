"""The ``flowrl`` command: a dispatcher. ``flowrl fit`` (and LightningCLI's other subcommands) train
(:mod:`flowrl.fit`); ``export``, ``sample``, ``serve-reward`` and ``convert`` are commands of their own."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from flowrl.errors import ConfigError


def main(args: Sequence[str] | None = None, run: bool = True):
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:  # a run's checkpoint -> diffusers weights or LoRA (flowrl/export.py)
        from flowrl.export import export_main

        return export_main(argv[1:])
    if argv[:1] == ["sample"]:  # images, a grid and reward scores from a model (flowrl/sample.py)
        from flowrl.sample import sample_main

        return sample_main(argv[1:])
    if argv[:1] == ["serve-reward"]:  # host a reward over HTTP (flowrl/rewards/remote.py)
        from flowrl.rewards.remote import serve_reward_main

        return serve_reward_main(argv[1:])
    if argv[:1] == ["convert"]:  # a Flow-Factory YAML config -> a flowrl config (flowrl/convert.py)
        from flowrl.convert import convert_main

        return convert_main(argv[1:])
    from flowrl.fit import fit_main

    return fit_main(argv, run=run)


def console_main(args: Sequence[str] | None = None) -> None:
    """The ``flowrl`` command: exit status 0 on success, 2 with one ``error:`` line for a refused configuration.

    ``--debug`` (or ``FLOWRL_DEBUG=1``) shows the traceback of a refused configuration as well."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("FLOWRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    from callbacks.guard import GuardConfigError

    try:
        main(argv)
    except (ConfigError, GuardConfigError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console_main()
