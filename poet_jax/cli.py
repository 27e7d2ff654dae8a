"""``poet-jax`` command line.

    poet-jax train CONFIG.yaml [key=value ...]     train (resumes if output_dir has checkpoints)
    poet-jax export RUN_DIR [--step N] [--out DIR] Orbax checkpoint -> Hugging Face directory
    poet-jax config CONFIG.yaml [key=value ...]    print the resolved, validated configuration
    poet-jax config --schema                       print every key, type, default and meaning

User errors (unknown key, bad value, missing file, bad data, a mesh that does not fit)
print one line ``poet-jax: error: ...`` and exit with status 2, without a traceback.

``train`` joins a multi-process job first when one is configured (POET_JAX_* variables,
SLURM, TPU pod; see docs/launch.md), so the same command runs as N processes. A
NaN/Inf step with ``train.on_nonfinite=stop`` prints one line naming the step and exits
with status 3. SIGTERM (preemption) writes a checkpoint of the current step and exits 0;
rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys


_USER_ERRORS = (
    ("poet_jax.train.config", "ConfigError"),
    ("poet_jax.data.errors", "DataError"),
    ("poet_jax.models.config", "UnsupportedModelError"),
    ("poet_jax.models.hf_io", "CheckpointError"),
    ("poet_jax.sharding", "MeshError"),
    ("poet_jax.distributed", "DistributedConfigError"),
)

EXIT_NONFINITE = 3


def _is_user_error(err: BaseException) -> bool:
    """Errors a user causes (config, data, unsupported model, mesh). Only already-imported modules are
    consulted: an error of a module that was never imported cannot have been raised."""
    for mod, name in _USER_ERRORS:
        module = sys.modules.get(mod)
        cls = getattr(module, name, None) if module is not None else None
        if cls is not None and isinstance(err, cls):
            return True
    return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poet-jax", description="Preference alignment (DPO, SimPO, ...) with POET in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy from a YAML config")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-6 data.use_poet=true")

    e = sub.add_parser("export", help="export a training checkpoint to a Hugging Face directory")
    e.add_argument("run_dir", help="train.output_dir of a run")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--out", default=None, help="output directory (default: <run_dir>/hf-step<N>)")

    # eval and demo own their argument parsers; main() hands them the rest of the command line
    sub.add_parser("eval", help="prefix-margin (M_k) and generation evaluation (poet-jax eval --help)", add_help=False)
    sub.add_parser("demo", help="the embedded DPO vs POET demo (poet-jax demo --help)", add_help=False)

    c = sub.add_parser("config", help="print the resolved configuration or the schema")
    c.add_argument("config", nargs="?", help="YAML config file")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    c.add_argument("--schema", action="store_true", help="print every key with its type, default and meaning")
    return p


def _cmd_config(args) -> int:
    import yaml

    from poet_jax.train.config import ConfigError, config_to_dict, load_config, schema_rows

    if args.schema:
        for row in schema_rows():
            choices = f" [{'|'.join(map(str, row['choices']))}]" if row["choices"] else ""
            print(f"{row['key']}: {row['type']} = {row['default']!r}{choices}  # {row['help']}")
        return 0
    if not args.config:
        raise ConfigError("config: give a YAML config file or --schema")
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _prefix_margin_hook(run) -> dict:
    """M_k metrics of the held-out pairs against the frozen reference (needs per-token reference
    log-probs, so not with a precomputed or no reference; single process only)."""
    import jax

    if run.state.ref_params is None or jax.process_count() > 1 or not run.eval_examples:
        return {}
    from poet_jax.evaluate.margins import prefix_margin_metrics

    metrics = prefix_margin_metrics(run.graphdef, run.state.params, run.state.ref_params, run.eval_examples,
                                    run.pad_id, beta=run.cfg.loss.beta, rest=run.state.rest,
                                    max_pairs=run.cfg.train.eval_pairs or 256)
    # the trainer's own eval logs rewards/*; keep this second computation under its own names
    metrics["M_k/full_margin"] = metrics.pop("rewards/margins")
    metrics["M_k/full_accuracy"] = metrics.pop("rewards/accuracies")
    return metrics


def _cmd_train(args) -> int:
    from poet_jax.train.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before joining a job: errors show at once
    from poet_jax.distributed import initialize_from_env, is_primary

    initialize_from_env()  # before any JAX computation
    from poet_jax.train.loop import train

    try:
        result = train(cfg, eval_hooks=[_prefix_margin_hook] if cfg.train.eval_prefix_margins else [])
    except Exception as err:  # noqa: BLE001
        _fail_fast_if_multiprocess(err)
        raise
    if is_primary():
        if result.get("preempted"):
            print(f"preempted: checkpoint at step {result['final_step']} written; rerun the same command to resume")
        elif result.get("export_dir"):
            print(f"final policy exported to {result['export_dir']}")
    return 0


def _fail_fast_if_multiprocess(err: BaseException) -> None:
    """In a multi-process job, a failed process (e.g. a collective broken by a dead peer) prints its
    traceback and one line naming itself, then exits at once with status 1 instead of waiting at JAX's
    shutdown barrier; its peers are stopped by JAX's heartbeat within ``POET_JAX_HEARTBEAT_TIMEOUT_S``."""
    import jax

    nonfinite = sys.modules.get("poet_jax.train.faults")
    if jax.process_count() == 1 or _is_user_error(err) or (
            nonfinite is not None and isinstance(err, nonfinite.NonFiniteError)):
        return  # every process raises these together: the normal exit path handles them
    import os
    import traceback

    traceback.print_exc()
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(f"poet-jax: error: process {jax.process_index()} of {jax.process_count()} failed ({type(err).__name__}: "
          f"{first[:300]}); stopping this process -- if another process died, see its log", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def _cmd_export(args) -> int:
    from poet_jax.train.export import export_checkpoint

    out = export_checkpoint(args.run_dir, out_dir=args.out, step=args.step)
    print(f"exported to {out}")
    return 0


def _delegated(command: str):
    if command == "eval":
        from poet_jax.evaluate.cli import main_eval

        return main_eval
    if command == "demo":
        from poet_jax.demo.run import main_demo

        return main_demo
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (delegate := _delegated(argv[0])) is not None:
        return delegate(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 on bad usage
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "config":
            return _cmd_config(args)
    except Exception as err:
        nonfinite = sys.modules.get("poet_jax.train.faults")
        if nonfinite is not None and isinstance(err, nonfinite.NonFiniteError):
            print(f"poet-jax: error: {err}", file=sys.stderr)
            return EXIT_NONFINITE
        if not _is_user_error(err):
            raise
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"poet-jax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poet-jax: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
