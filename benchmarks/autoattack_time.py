"""Wall-clock time of the AutoAttack cascade per attack, on the default digits model.

    python -m benchmarks.autoattack_time [--workdir DIR] [--epochs N] [--budgets 0.1,0.2]
        [--norm linf|l2] [--version standard|quick] [--loop auto|host|device]
        [--square-chunk N] [--cpu-devices N] [--examples N] [--sanity] [--json FILE]
    python -m benchmarks.autoattack_time --kernels --workdir DIR [--batch 512]

With ``--workdir`` of an existing run (``metrics.json`` and a checkpoint) its model is
attacked; otherwise the default configuration (``anp_jax/configs/default.py``, with
``--epochs`` epochs) is trained first with :func:`anp_jax.trainer.train_and_evaluate` into
``--workdir`` (or a temporary directory).  Each budget runs the whole cascade of
:func:`anp_jax.evaluation.autoattack.autoattack` on the test split (its first
``--examples``, default all), one budget after the
other in one process, so the first one pays the compilations and the later ones reuse them.
On CPU, ``--cpu-devices`` (default -1: one per core) splits the host into that many XLA
devices (:func:`anp_jax.cli.split_host`), so that the pmapped attacks run one thread per
core (a single XLA:CPU device runs these small convolutions on one thread).
``--kernels`` instead times the passes the attacks are made of, on one batch of ``--batch``
test images of the run's model, each jitted on its own (median of 10 calls after a
warm-up, milliseconds): the forward pass, APGD's loss and input gradient, one APGD step
(:func:`~anp_jax.evaluation.autoattack.apgd_step`) and one FAB-T step
(:func:`~anp_jax.evaluation.autoattack.fab_step`) at L-inf ``--budgets``' first value.
Prints one table row per (budget, attack): examples attacked, robust accuracy after the
attack, seconds; then the total, in wall-clock time and in CPU time of the process (on a
shared machine the CPU time is the steadier measure).  ``--sanity`` then also runs
:func:`anp_jax.evaluation.autoattack.sanity_runs` per budget (twice the iterations, Square
alone, APGD-T alone; not timed in the total) and prints the checks.  ``--json`` writes the
records, the timings, the checks and the machine (CPU count, load average, devices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="a trained run, or where to train one")
    parser.add_argument("--epochs", type=int, default=30, help="epochs when training")
    parser.add_argument("--budgets", default="0.1,0.2", help="comma-separated eps values")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--version", default="standard", choices=("standard", "quick"))
    parser.add_argument("--loop", default="auto", choices=("auto", "host", "device"),
                        help="who drives the attack iterations (see autoattack())")
    parser.add_argument("--square-chunk", type=int, default=500,
                        help="Square queries between compactions")
    parser.add_argument("--cpu-devices", "--cpu_devices", type=int, default=-1,
                        dest="cpu_devices",
                        help="XLA host devices on CPU (-1: one per core; 0: leave XLA_FLAGS "
                        "alone); also spelled --cpu_devices, as in anp-jax eval")
    parser.add_argument("--examples", type=int, default=0,
                        help="attack the first N test examples (default 0: all)")
    parser.add_argument("--sanity", action="store_true", help="also run the sanity checks")
    parser.add_argument("--kernels", action="store_true",
                        help="time the attacks' passes on one batch instead (see above)")
    parser.add_argument("--batch", type=int, default=512, help="--kernels: the batch")
    parser.add_argument("--json", default="", help="write the results here")
    return parser.parse_args(argv)


def _model(workdir: str, epochs: int):
    """(run, images, labels) of ``workdir``, training the default config there if needed."""
    from anp_jax import data as data_lib
    from anp_jax import load_run, trainer
    from anp_jax.configs import default

    if not os.path.exists(os.path.join(workdir, "metrics.json")):
        config = default.get_config()
        config.num_epochs = epochs
        print(f"training the default model for {epochs} epochs into {workdir}", file=sys.stderr)
        trainer.train_and_evaluate(config, workdir, progress=False)
    run = load_run(workdir)
    dataset = run.config["dataset"]
    images, labels = data_lib.load_split(dataset, data_lib.get_spec(dataset).test_split,
                                         run.config.get("data_dir") or None)
    return run, images, labels


def kernel_times(run, images, labels, batch: int, eps: float) -> dict[str, float]:
    """Median milliseconds per call of the attacks' passes (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from anp_jax import data as data_lib
    from anp_jax.evaluation import autoattack
    from anp_jax.train import logits_fn

    x = np.asarray(images[:batch])
    x = jnp.asarray(data_lib.to_float(x) if x.dtype == np.uint8 else x, jnp.float32)
    y = jnp.asarray(labels[:batch], jnp.int32)
    v = run.variables
    fn = logits_fn(run.module.apply, v["params"], v.get("batch_stats", {}))
    apgd_state = jax.jit(lambda x, y: autoattack.apgd_init(
        fn, x, y, eps, rng=jax.random.PRNGKey(0)))(x, y)
    passes = {
        "forward": (jax.jit(fn), (x,)),
        "loss_and_input_gradient": (jax.jit(lambda z, y: autoattack._loss_grad(
            fn, z, y, y, "ce")), (x, y)),
        "apgd_step": (jax.jit(lambda s, x, y: autoattack.apgd_step(
            fn, s, x, y, eps, 3, num_steps=100)), (apgd_state, x, y)),
        "fab_step": (jax.jit(lambda s, x, y: autoattack.fab_step(fn, s, x, y)),
                     (autoattack.fab_init(fn, x), x, y)),
    }
    out = {}
    for name, (f, args) in passes.items():
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * float(np.median(times))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from anp_jax.cli import split_host

    try:
        split_host(args.cpu_devices)  # before jax is imported
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    import jax

    from anp_jax.evaluation import autoattack

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        print(f"--budgets must be comma-separated numbers, got {args.budgets!r}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        run, images, labels = _model(args.workdir or tmp, args.epochs)
    if args.examples > 0:
        images, labels = images[:args.examples], labels[:args.examples]
    if args.kernels:
        from anp_jax import cli

        cli.keep_freed_memory(True)  # as the command lines do
        times = kernel_times(run, images, labels, args.batch, budgets[0])
        for name, ms in times.items():
            print(f"{name:>24} {ms:8.1f} ms  (batch {args.batch}, {jax.devices()[0]})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"kernels_ms": times, "batch": args.batch, "workdir": args.workdir,
                           "load_average": os.getloadavg()}, f, indent=1)
        return 0
    variables = run.variables
    load_before = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    records = []
    for eps in budgets:
        records.append(autoattack.autoattack(
            run.module.apply, variables["params"], variables.get("batch_stats", {}), images,
            labels, eps=eps, norm=args.norm, version=args.version, loop=args.loop,
            square_chunk=args.square_chunk, log=lambda m: print(m, file=sys.stderr)))
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"{'budget':>8} {'attack':>8} {'attacked':>9} {'robust':>7} {'seconds':>8}")
    for record in records:
        print(f"{record['eps']:>8g} {'clean':>8} {record['num_examples']:>9} "
              f"{record['clean_accuracy']:>7.4f} {record['seconds']['clean']:>8.1f}")
        for stage in record["stages"]:
            print(f"{record['eps']:>8g} {stage['attack']:>8} {stage['num_attacked']:>9} "
                  f"{stage['robust_accuracy']:>7.4f} {stage['seconds']:>8.1f}")
    print(f"total {total:.1f} s wall-clock, {cpu:.1f} s CPU time of this process, for "
          f"{len(budgets)} budgets ({args.version}, {args.norm}); load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    checks = {}
    if args.sanity:
        for record in records:
            runs = autoattack.sanity_runs(
                run.module.apply, variables["params"], variables.get("batch_stats", {}),
                images, labels, eps=record["eps"], norm=args.norm, version=args.version,
                loop=args.loop, square_chunk=args.square_chunk)
            found, warnings = autoattack.sanity_checks(record, runs)
            checks[f"{record['eps']:g}"] = {"checks": found, "warnings": warnings,
                                            "robust_accuracy": {k: r["robust_accuracy"]
                                                                for k, r in runs.items()}}
            for check in found:
                print(f"{'ok  ' if check['passed'] else 'FAIL'} {check['name']}: "
                      f"{check['detail']}")
    if args.json:
        out = {"total_seconds": total, "cpu_seconds": cpu, "version": args.version,
               "norm": args.norm, "budgets": budgets, "loop": args.loop,
               "square_chunk": args.square_chunk, "cpu_devices": args.cpu_devices,
               "workdir": args.workdir, "examples": len(labels), "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "devices": [str(d) for d in jax.local_devices()], "records": records,
               "sanity": checks}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
