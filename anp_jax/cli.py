"""The ``anp-jax`` command.

    anp-jax train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]
    anp-jax eval --workdir=DIR [--source_workdir=DIR2] [--baseline_workdir=DIR3] [--quick]

``train`` and ``eval`` share one flag parser (absl flags with ``ml_collections``'
``config_flags``): :func:`parse_config_flags`, which scripts reuse with flags of their own.
With no ``--config`` it trains the embedded default (``anp_jax/configs/default.py``).
Several processes (multi-host): pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or ``--distributed`` on a TPU pod or under SLURM, where JAX detects them).

Exit statuses: 0 done; 2 a bad command line or config (one line on stderr), including a
workdir that holds a run of another config (nothing on disk is touched); 1 the data set is
missing or training failed (a non-finite loss); 143 stopped by SIGTERM and 130 by SIGINT,
after the step in flight, with a checkpoint saved (run the same command to resume).

JAX's persistent compilation cache is on by default (``--compile_cache_dir``, default
``$ANP_JAX_CACHE_DIR`` or ``~/.cache/anp-jax/jax``; ``--nocompile_cache`` turns it off), so
a second run on the same machine starts training without compiling again.
"""

from __future__ import annotations

import os
import sys

# Before anything imports TensorFlow or JAX: their C++ logging prints at import time
# ("All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on").
# TF_ENABLE_ONEDNN_OPTS=0 only changes TensorFlow's own ops (the input pipeline), not JAX.
for _name, _value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TF_ENABLE_ONEDNN_OPTS", "0"),
                      ("GRPC_VERBOSITY", "ERROR"), ("GLOG_minloglevel", "3")):
    os.environ.setdefault(_name, _value)

import ast  # noqa: E402
import difflib  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Callable  # noqa: E402

PROG = "anp-jax"
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
CACHE_ENV = "ANP_JAX_CACHE_DIR"

USAGE = """usage: anp-jax train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]
       anp-jax eval --workdir=DIR [--source_workdir=DIR2] [--baseline_workdir=DIR3] [--quick]

commands:
  train   train (resuming from the newest checkpoint in DIR), evaluate, write DIR/metrics.json,
          learning curves in DIR/metrics.jsonl and TensorBoard event files in DIR
  eval    the full robustness report of the model in DIR, into DIR/metrics.json and DIR/report/

'anp-jax train --help' and 'anp-jax eval --help' list the flags and every config field.
Exit statuses: 0 done, 2 bad command line or config, 1 missing data or failed training,
143 stopped by SIGTERM and 130 by SIGINT (checkpoint saved; rerun to resume).
"""


class UsageError(Exception):
    """A bad command line."""


# --------------------------------------------------------------------------------------
# Config fields, their defaults and meanings


def config_field_docs(path: str = DEFAULT_CONFIG) -> dict[str, str]:
    """``{dotted field: meaning}`` from the comments of a config file: the comment at the
    end of ``config.FIELD = ...`` and the full-line comments right above it."""
    docs: dict[str, str] = {}
    above: list[str] = []
    assign = re.compile(r"^\s*config\.([A-Za-z_][\w.]*)\s*=\s*(.*)$")
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = assign.match(line)
            if match:
                field, rest = match.groups()
                trailing = _trailing_comment(rest)
                docs[field] = " ".join(above + ([trailing] if trailing else []))
            above = []
    return docs


def _trailing_comment(code: str) -> str:
    """The ``# comment`` at the end of a line of code (not a ``#`` inside a string)."""
    for i, ch in enumerate(code):
        if ch == "#":
            try:
                ast.parse(code[:i].strip() or "None")
            except SyntaxError:
                continue
            return code[i + 1:].strip()
    return ""


def _fields(config, prefix: str = "") -> dict[str, object]:
    """``{dotted field: value}`` of a ConfigDict, leaves only."""
    out: dict[str, object] = {}
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys") and hasattr(value, "to_dict"):
            out.update(_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_help(config, docs: dict[str, str] | None = None, width: int = 100) -> str:
    """Every field of ``config`` with its default and meaning, for ``--help``."""
    docs = config_field_docs() if docs is None else docs
    lines = []
    for field, value in _fields(config).items():
        head = f"  --config.{field}={value!r}"
        meaning = docs.get(field, "")
        group = field.rsplit(".", 1)[0] if "." in field else ""
        if group and docs.get(group) and not any(
                line.startswith(f"  --config.{group}.") for line in lines):
            lines.append(f"  [{group}] {docs[group]}")
        lines.append(head)
        if meaning:
            lines += textwrap.wrap(meaning, width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


def load_config_file(path: str | None):
    """The ``get_config()`` of a config file (``FILE`` or ``FILE:ARG``), or the default."""
    from ml_collections import config_flags  # noqa: F401  (the same loader semantics)

    path = path or DEFAULT_CONFIG
    arg = None
    if not os.path.exists(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not os.path.exists(path):
        raise UsageError(f"cannot load config file {path!r}: no such file")
    spec = importlib.util.spec_from_file_location("anp_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 (a user's file: one line)
        raise UsageError(f"cannot load config file {path!r}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not hasattr(module, "get_config"):
        raise UsageError(f"cannot load config file {path!r}: it has no get_config()")
    return module.get_config(arg) if arg is not None else module.get_config()


def _config_path_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_override_fields(argv: list[str], config) -> None:
    """One line for a misspelt ``--config.FIELD``, with the closest field."""
    known = _fields(config)
    groups = {f.rsplit(".", 1)[0] for f in known if "." in f}
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config."):].split("=", 1)[0]
        if field in known or field in groups:
            continue
        match = difflib.get_close_matches(field, list(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else \
            " (anp-jax train --help lists the fields)"
        raise UsageError(f"unknown config field '{field}'{hint}")


# --------------------------------------------------------------------------------------
# The shared parser


def _define_common(fv, workdir: bool = True) -> None:
    from absl import flags

    if workdir:
        flags.DEFINE_string("workdir", None, "the run's directory: checkpoints, config.json, "
                            "metrics.json, metrics.jsonl, event files (local or gs://)",
                            flag_values=fv)
    flags.DEFINE_bool("compile_cache", True, "use JAX's persistent compilation cache",
                      flag_values=fv)
    flags.DEFINE_string("compile_cache_dir", "", f"its directory (default ${CACHE_ENV} or "
                        "~/.cache/anp-jax/jax)", flag_values=fv)
    flags.DEFINE_bool("tune_malloc", True, "glibc: keep XLA:CPU's per-step temporaries in "
                      "the heap instead of mapping fresh pages at every step", flag_values=fv)


def _define_train(fv) -> None:
    from absl import flags

    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, "
                      "SLURM: JAX detects the processes)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several "
                        "processes by hand)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)


def _define_eval(fv) -> None:
    from absl import flags

    flags.DEFINE_string("source_workdir", None, "a run whose model crafts black-box "
                        "transfer attacks", flag_values=fv)
    flags.DEFINE_string("baseline_workdir", None, "a run whose corruption errors normalise "
                        "the mCE", flag_values=fv)
    flags.DEFINE_bool("quick", False, "a reduced set of attacks, budgets, corruptions and "
                      "frames", flag_values=fv)
    flags.DEFINE_integer("cpu_devices", -1, "XLA host devices the evaluation is split over "
                         "on CPU (-1: one per core this process may use; 0: leave XLA_FLAGS "
                         "alone; also left alone when XLA_FLAGS sets a device count)",
                         flag_values=fv)


def _flags_help(fv, names: list[str]) -> str:
    lines = []
    for name in names:
        flag = fv[name]
        kind = "bool: --[no]" if flag.flag_type() == "bool" else "--"
        default = "" if flag.default in (None, "") else f" (default {flag.default!r})"
        lines.append(f"  {kind}{name}{default}")
        lines += textwrap.wrap(flag.help, 100, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_config_flags(argv: list[str], define_extra: Callable | None = None, *,
                       prog: str = PROG, require_workdir: bool = True,
                       help_text: str = "") -> tuple[object, object]:
    """Parses ``argv`` (without the program name) the way ``anp-jax`` does.

    Flags: ``--workdir`` (with ``require_workdir``), ``--[no]compile_cache``,
    ``--compile_cache_dir``, ``--config=FILE`` and ``--config.FIELD=VALUE`` for every field
    of the config (ml_collections' ``config_flags``), plus those
    ``define_extra(flag_values)`` defines.  ``-h``/``--help`` raises ``SystemExit(0)``
    after printing the flags and every config field with its default and meaning.

    Returns ``(flag_values, config)``; the config is locked (no new fields).

    Raises:
      UsageError: one line: an unknown flag, a misspelt field (with the closest one), a
        bad value, a config file that does not load, a missing ``--workdir``.
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    _define_common(fv, workdir=require_workdir)
    if define_extra is not None:
        define_extra(fv)
    own = [name for name in fv if name != "config"]
    base = load_config_file(_config_path_arg(argv))
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        print(f"{help_text}\nflags:\n{_flags_help(fv, own)}\n  --config=FILE\n      an "
              f"ml_collections config file with get_config() (default: the embedded "
              f"default)\n\nconfig fields (--config.FIELD=VALUE; defaults of "
              f"{_config_path_arg(argv) or 'the embedded default'}):\n{config_help(base)}")
        raise SystemExit(0)
    _check_override_fields(argv, base)
    try:
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=[prog] + argv)
        fv([prog] + argv)
    except flags.Error as err:
        raise UsageError(str(err).strip().splitlines()[0]) from None
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        text = str(err).strip().strip("'\"").splitlines()
        raise UsageError(f"bad config override: {text[0] if text else type(err).__name__}"
                         ) from None
    if require_workdir and not fv.workdir:
        raise UsageError("--workdir is required")
    config = fv.config
    try:
        config.to_dict()  # a config file that did not load is an error proxy that raises
    except OSError:
        raise UsageError(f"cannot load config file {fv['config'].config_filename!r}: "
                         "no such file, or it has no get_config()") from None
    return fv, config


def setup_compile_cache(enabled: bool = True, directory: str = "") -> str | None:
    """Turns on JAX's persistent compilation cache (every program compiled for more than
    0.1 s is kept); returns its directory, or None when ``enabled`` is false."""
    if not enabled:
        return None
    import jax

    directory = directory or os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "anp-jax", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def split_host(num_devices: int = -1) -> int | None:
    """Splits the CPU into ``num_devices`` XLA host devices (``-1``: one per core this process
    may use) by adding ``--xla_force_host_platform_device_count`` to ``XLA_FLAGS``, unless it
    is ``0`` or ``XLA_FLAGS`` already sets a count.  The evaluation pmaps over the local
    devices, and one XLA:CPU device runs the small convolutions of the attacks on about one
    thread: on 2 cores, 2 devices run AutoAttack about 20% faster (README.md).  Only
    effective before JAX initialises its backends; accelerators are unaffected.  Returns the
    count set, or None.  Raises ValueError (one line naming ``--cpu_devices``) below -1."""
    if num_devices < -1:
        raise ValueError(f"--cpu_devices must be -1, 0 or a count, got {num_devices}")
    flags_now = os.environ.get("XLA_FLAGS", "")
    if num_devices == 0 or "xla_force_host_platform_device_count" in flags_now:
        return None
    if num_devices < 0:
        num_devices = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    os.environ["XLA_FLAGS"] = (
        f"{flags_now} --xla_force_host_platform_device_count={num_devices}".strip())
    return num_devices


def keep_freed_memory(enabled: bool = True) -> bool:
    """Serves large host allocations from the heap and keeps freed memory (glibc ``mallopt``:
    no ``mmap`` for large blocks, trim above 1 GiB).  XLA:CPU allocates each step's
    temporaries afresh; above glibc's 32 MiB mmap ceiling every step maps new pages and
    faults them in, which made the two-update steps of ANP and replay 4-9% slower per update
    than plain training on VGG-11 (benchmarks/RESULTS.md).  Process-wide, so only the
    command lines call it (``--notune_malloc`` leaves the allocator alone).  Returns whether
    it took effect (glibc only)."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _quiet_python_logs() -> None:
    from absl import logging

    logging.set_verbosity(logging.ERROR)


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


def _error(err: Exception | str) -> None:
    print(f"{PROG}: error: {err}", file=sys.stderr)


def _train(argv: list[str]) -> int:
    try:
        fv, config = parse_config_flags(
            argv, _define_train, help_text=USAGE.splitlines()[0] + "\n\n" + (
                "Trains (resuming from the newest checkpoint in --workdir), evaluates and "
                "writes DIR/metrics.json.\n"))
    except UsageError as err:
        _error(err)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    _quiet_python_logs()
    setup_compile_cache(fv.compile_cache, fv.compile_cache_dir)
    keep_freed_memory(fv.tune_malloc)
    from anp_jax import checkpoint as ckpt_lib
    from anp_jax import data as data_lib
    from anp_jax import trainer

    try:
        _init_distributed(fv)
        metrics = trainer.train_and_evaluate(config, fv.workdir)
    except (UsageError, trainer.ConfigError, ckpt_lib.CheckpointMismatchError) as err:
        _error(err)
        return 2
    except (data_lib.DatasetError, trainer.TrainingError) as err:
        _error(err)
        return 1
    except trainer.Preempted as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the newest checkpoint is kept", file=sys.stderr)
        return 130
    import jax

    if jax.process_index() == 0:
        print(trainer.format_report(metrics))
        print(f"metrics written to {fv.workdir.rstrip('/')}/metrics.json")
    return 0


def _eval(argv: list[str]) -> int:
    try:
        fv, _ = parse_config_flags(
            argv, _define_eval, help_text=USAGE.splitlines()[1].strip() + "\n\n" + (
                "The full robustness report of the model in --workdir (its config is the "
                "run's own,\nDIR/config.json; --config.FIELD overrides apply to train).\n"))
    except UsageError as err:
        _error(err)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    overrides = [a for a in argv if a.startswith("--config")]
    if overrides:
        _error(f"{overrides[0].split('=')[0]}: eval uses the config the run was trained "
               "with; config overrides apply to train")
        return 2
    try:
        split_host(fv.cpu_devices)
    except ValueError as err:
        _error(str(err))
        return 2
    _quiet_python_logs()
    setup_compile_cache(fv.compile_cache, fv.compile_cache_dir)
    keep_freed_memory(fv.tune_malloc)
    from anp_jax import report

    rest = [f"--workdir={fv.workdir}"]
    rest += [f"--source_workdir={fv.source_workdir}"] if fv.source_workdir else []
    rest += [f"--baseline_workdir={fv.baseline_workdir}"] if fv.baseline_workdir else []
    rest += ["--quick"] if fv.quick else []
    return report.main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "eval":
        return _eval(rest)
    _error(f"unknown command {command!r}; try 'anp-jax --help'")
    return 2


if __name__ == "__main__":
    sys.exit(main())
