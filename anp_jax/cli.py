"""The ``anp-jax`` command.

    anp-jax train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]
    anp-jax eval --workdir=DIR [...]      (see :mod:`anp_jax.report`)

With no ``--config`` it trains the embedded default (``anp_jax/configs/default.py``).
Several processes (multi-host): pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or nothing on a TPU pod, where ``--distributed`` auto-detects them).
Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: anp-jax train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]
       anp-jax eval --workdir=DIR [--source_workdir=DIR2] [--baseline_workdir=DIR3] [--quick]

commands:
  train   train (resuming from the newest checkpoint in DIR), evaluate, write DIR/metrics.json
  eval    the full robustness report of the model in DIR, into DIR/metrics.json and DIR/report/

options of train:
  --workdir=DIR              where checkpoints and metrics.json go (required)
  --config=FILE              an ml_collections config file (default: the embedded default)
  --config.FIELD=VALUE       override one field, e.g. --config.method=vanilla
  --distributed              call jax.distributed.initialize() (TPU pods, SLURM)
  --coordinator_address=H:P --num_processes=N --process_id=I   several processes by hand
"""

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")


class UsageError(Exception):
    """A bad command line."""


def _parse(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Working directory.", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Initialise jax.distributed.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
    try:
        # Overrides are read from ``sys_argv`` (and applied as soon as the default loads).
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["anp-jax"] + argv)
        fv(["anp-jax"] + argv)
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        raise UsageError(f"bad config override (unknown field or value): "
                         f"{str(err).splitlines()[0]}") from None
    if not fv.workdir:
        raise UsageError("--workdir is required")
    config = fv.config
    try:
        config.to_dict()  # a config file that did not load is an error proxy that raises
    except OSError:
        raise UsageError(f"cannot load config file {fv['config'].config_filename!r}: "
                         "no such file, or it has no get_config()") from None
    return fv, config


def _init_distributed(fv) -> None:
    import jax

    if fv.coordinator_address or fv.num_processes or fv.process_id is not None:
        if not (fv.coordinator_address and fv.num_processes and fv.process_id is not None):
            raise UsageError("--coordinator_address, --num_processes and --process_id go "
                             "together")
        # Cross-process collectives on CPU (no effect on GPU or TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    elif fv.distributed:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "eval":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from anp_jax import report

        return report.main(rest)
    if command != "train":
        print(f"anp-jax: error: unknown command {command!r}; try 'anp-jax --help'",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from anp_jax import data as data_lib
    from anp_jax import trainer

    try:
        fv, config = _parse(rest)
        _init_distributed(fv)
        metrics = trainer.train_and_evaluate(config, fv.workdir)
    except (UsageError, trainer.ConfigError, data_lib.DatasetError,
            trainer.TrainingError) as err:
        print(f"anp-jax: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError | trainer.ConfigError) else 1
    except KeyboardInterrupt:
        print("anp-jax: interrupted; the newest checkpoint is kept", file=sys.stderr)
        return 130
    import jax

    if jax.process_index() == 0:
        print(trainer.format_report(metrics))
        print(f"metrics written to {os.path.join(fv.workdir, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
