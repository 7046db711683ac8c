"""Environments for the processes the tests start (no side effects: the tests' own
subprocesses import it too)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On a loaded 2-core machine one fake device's thread can be kept off the CPU for longer than
# XLA's 40 s limit on a collective's rendezvous, which aborts the process: tests wait 10 min.
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                       " --xla_cpu_collective_call_terminate_timeout_seconds=600")


def xla_flags(devices, *extra):
    """``XLA_FLAGS`` for a process of the tests with ``devices`` fake CPU devices."""
    return " ".join([f"--xla_force_host_platform_device_count={devices}",
                     PATIENT_COLLECTIVES, *extra])


def with_repo_on_path(env):
    """``env`` with the repository in front of its ``PYTHONPATH`` (runs ``experiments``,
    ``benchmarks`` and the docs' code as a user's checkout does)."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env
