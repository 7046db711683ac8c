"""Shared fixtures: eight fake CPU devices and the digits prepared once per session."""

import os

from procs import xla_flags

# Must happen before jax is imported anywhere: tests of pmap use 8 fake CPU devices.
# Tests compile far more than they run: compile fast.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags(
    8, "--xla_backend_optimization_level=0")]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import atexit  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# The CLI runs' persistent compilation cache: this session's own (runs of one config share
# their programs), never the user's.
_CACHE = tempfile.mkdtemp(prefix="anp-jax-test-jit-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data directory holding the prepared digits; also set as $TFDS_DATA_DIR."""
    path = str(tmp_path_factory.mktemp("tfds"))
    os.environ["TFDS_DATA_DIR"] = path
    from anp_jax import data

    data.load_split("digits", "test", path)
    return path


def cli_env(data_dir, devices=1):
    """Environment for an ``anp-jax`` subprocess with ``devices`` fake CPU devices."""
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="3",
               ANP_JAX_CACHE_DIR=_CACHE)
    env["XLA_FLAGS"] = xla_flags(devices)
    return env


def run_cli(args, data_dir, devices=1, timeout=600):
    """Runs ``python -m anp_jax ARGS`` to completion; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "anp_jax", *args],
                          env=cli_env(data_dir, devices), capture_output=True, text=True,
                          timeout=timeout)


def start_cli(args, data_dir, devices=1):
    """Starts ``python -m anp_jax ARGS`` in the background; returns the Popen."""
    return subprocess.Popen([sys.executable, "-m", "anp_jax", *args],
                            env=cli_env(data_dir, devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
