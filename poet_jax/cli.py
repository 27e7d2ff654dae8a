"""``poet-jax`` command line.

    poet-jax train CONFIG.yaml [key=value ...]     train (resumes if output_dir has checkpoints)
    poet-jax export RUN_DIR [--step N] [--out DIR] Orbax checkpoint -> Hugging Face directory
    poet-jax config CONFIG.yaml [key=value ...]    print the resolved, validated configuration
    poet-jax config --schema                       print every key, type, default and meaning

User errors (unknown key, bad value, missing file, bad data) print one line
``poet-jax: error: ...`` and exit with status 2, without a traceback.
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
)


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


def _cmd_train(args) -> int:
    from poet_jax.train.config import load_config
    from poet_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.get("export_dir"):
        print(f"final policy exported to {result['export_dir']}")
    return 0


def _cmd_export(args) -> int:
    from poet_jax.train.export import export_checkpoint

    out = export_checkpoint(args.run_dir, out_dir=args.out, step=args.step)
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
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
