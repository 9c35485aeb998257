"""The `sae` command. Each subcommand is a dataclass of options (docstring under every field) and
a function taking it; the argparse flags are generated from the dataclass, and any option can also
come from a YAML/JSON file given with --config (flags on the command line win).
Subcommands that live in train/ and eval/ are imported only when they run.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import json
import os
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


# -- dataclass -> argparse ------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the sparsify/simple_parsing style),
    inherited ones included: base dataclasses first, so that a subclass's own docstring wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
    return docs


def positional() -> Any:
    """A required positional argument (marks a dataclass field)."""
    return field(default="", metadata={"positional": True})


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: --field-name, typed by its default (an unset one, None, by its
    annotation); bools get --x/--no-x; lists take
    several values or the flag repeated. Unset flags stay out of the namespace (SUPPRESS) so that
    a config file's values are not overwritten by defaults."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        default = _default(f)
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if f.metadata.get("cli") is False:  # set from a --config file only
            continue
        if f.metadata.get("positional"):  # may come from --config: checked in build_options
            many = "*" if isinstance(default, list) else "?"
            parser.add_argument(
                f.name, metavar=f.name.upper(), help=help_text, nargs=many, default=None
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{help_text} (default: {default})"
        if isinstance(default, bool) or item_type(hints[f.name]) is bool:  # bool, or bool | None
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif isinstance(default, list):
            item = item_type(hints[f.name])
            parser.add_argument(
                flag,
                nargs="+",
                action="extend",
                type=item,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=item.__name__.upper(),
            )
        else:
            kind = type(default) if default is not None else item_type(hints[f.name])
            parser.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=kind.__name__.upper(),
            )


def build_options(cls: type, namespace: argparse.Namespace) -> Any:
    """Defaults, then the --config file, then the command-line flags."""
    defaults = {f.name: _default(f) for f in fields(cls)}
    values: dict[str, Any] = {}
    if path := getattr(namespace, "config", None):
        loaded = _read_config(path)
        if unknown := sorted(set(loaded) - set(defaults)):
            raise SystemExit(f"sae: {path}: unknown options {unknown}; known: {sorted(defaults)}")
        hints = typing.get_type_hints(cls)
        values.update(
            {
                k: as_option_type(v, defaults[k], f"{path}: {k}", item_type(hints[k]))
                for k, v in loaded.items()
            }
        )
    values.update({k: v for k, v in vars(namespace).items() if k in defaults and v is not None})
    missing = [
        f.name.upper()
        for f in fields(cls)
        if f.metadata.get("positional") and not values.get(f.name)
    ]
    if missing:
        raise SystemExit(f"sae: {', '.join(missing)} required (as an argument or in --config)")
    return cls(**values)


def _read_config(path: str) -> dict[str, Any]:
    """A --config file's mapping, keys with dashes as with underscores."""
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SystemExit(f"sae: --config {path}: {e}") from e
    if not isinstance(loaded, dict | None):
        raise SystemExit(f"sae: {path} should hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}


def item_type(hint: Any) -> type:
    """The items' type of a list option's annotation (list[int] -> int), or an optional one's
    type (bool | None -> bool); str when unsaid."""
    return (typing.get_args(hint) or (str,))[0]


def as_option_type(value: Any, default: Any, where: str, item: type = str) -> Any:
    """A config file's value as the option's type (that of its default, as for the flags; a
    list's items, and the value of an option unset by default, as `item`). YAML reads `1e-3` and
    `2e6` as strings and `no` as a bool: numbers in strings are converted, and anything that
    would reach the run as the wrong type is refused here, naming the option."""
    if default is None:  # an optional setting (`bool | None`): unset, or of the annotation's type
        return None if value is None else as_option_type(value, item(), where)
    kind = type(default)

    def refuse() -> ValueError:
        return ValueError(f"{where} should be {kind.__name__}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse()
        return value
    if isinstance(default, list):
        value = [value] if isinstance(value, str) else value  # one hookpoint for a list of them
        if not isinstance(value, list):
            raise refuse()
        if item not in (bool, int, float, str):  # the sweep's mappings: typed by TrainConfig.specs
            return value
        return [as_option_type(v, item(), f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(default, int | float):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise refuse() from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise refuse()
        if kind is int and not float(number).is_integer():  # 1.5, inf, nan
            raise refuse()
        return kind(number)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise refuse()
    return str(value)


# -- subcommands ----------------------------------------------------------------------------------
@dataclass
class InfoOptions:
    """Load a dictionary from any source and print its config and weight statistics."""

    source: str = positional()
    """A local directory, hf:org/repo[/subdir], saelens:<release>/<sae_id> or
    wandb:entity/project/name[:version]."""


def run_info(opts: InfoOptions) -> None:
    import sae

    d = sae.load(opts.source)
    print(json.dumps(d.cfg.to_dict(), indent=2))
    norms = d.W_dec.norm(dim=1)
    print(f"decoder row norms: min {norms.min():.4f} mean {norms.mean():.4f} max {norms.max():.4f}")
    print(f"parameters: {sum(p.numel() for p in d.parameters()):,}")


@dataclass
class ConvertOptions:
    """Load a dictionary from any source (SAELens, sparsify, hf:, saelens:) and save it in
    sae-forge's layout, which SAELens also loads."""

    source: str = positional()
    """A local directory, hf:org/repo[/subdir], saelens:<release>/<sae_id> or
    wandb:entity/project/name[:version]."""
    out: str = positional()
    """Directory to write cfg.json and sae_weights.safetensors into."""
    dtype: str = "float32"
    """dtype of the saved weights."""
    overwrite: bool = False
    """Replace an SAE already in OUT (never the source itself: write elsewhere)."""


def run_convert(opts: ConvertOptions) -> None:
    import sae
    from sae.io import CFG_FILE, WEIGHTS_FILE

    out = Path(opts.out)
    if Path(opts.source).exists() and Path(opts.source).resolve() == out.resolve():
        raise ValueError(f"OUT {opts.out} is the source itself; convert into another directory")
    held = [n for n in (CFG_FILE, WEIGHTS_FILE) if (out / n).exists()]
    if held and not opts.overwrite:
        raise FileExistsError(
            f"{opts.out} already holds an SAE ({', '.join(held)}); pass --overwrite to replace it"
        )
    sae.load(opts.source, dtype=opts.dtype).save(opts.out)
    print(f"saved {opts.source} to {opts.out}")


@dataclass
class ExportOptions:
    """Write a dictionary, or a folder of them, in another tool's layout: circuit-tracer (a
    per-layer transcoder set from a run's folder), sparsify or saelens."""

    source: str = positional()
    """A dictionary's directory, or a folder of them (circuit-tracer: one transcoder per layer)."""
    out: str = positional()
    """Directory to write into."""
    format: str = "circuit-tracer"
    """circuit-tracer, sparsify or saelens."""
    model_folder: str = ""
    """Also write the dictionary's LM here as a Hugging Face folder that circuit-tracer's
    transformers (<= 4.57) reads as ours: needed for the embedded smollm2-135m."""
    overwrite: bool = False
    """Write into an OUT that already holds files."""


def run_export(opts: ExportOptions) -> None:
    from sae.export import export

    out = Path(opts.out)
    if Path(opts.source).resolve() == out.resolve():
        raise ValueError(f"OUT {opts.out} is the source itself; export into another directory")
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        raise FileExistsError(f"{opts.out} is not empty; pass --overwrite to write into it")
    written = export(opts.source, opts.format, out)
    print(f"wrote {opts.source} as {opts.format} to {opts.out}")
    if opts.model_folder:
        from sae.export import write_model_folder
        from sae.io import load_set

        first = load_set(opts.source)[0].cfg
        model = first.model_name
        write_model_folder(model, opts.model_folder, first.model_revision)
        print(f"wrote {model} to {opts.model_folder}; in circuit-tracer: ReplacementModel."
              f"from_pretrained_and_transcoders({opts.model_folder!r}, <loaded {written}>, "
              "backend='nnsight')")  # fmt: skip


@dataclass(frozen=True)
class Command:
    """A subcommand: its options dataclass and run function as "module:name" strings, imported
    only when needed so that `sae --help` does not load torch models or the trainer."""

    help: str
    options: str
    run: str


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "harvest, train and evaluate the embedded default end to end (runs/demo/)",
        "eval.demo:DemoConfig",
        "eval.demo:run_demo",
    ),
    "harvest": Command(
        "stream LM activations into a sharded activation cache",
        "train.config:HarvestConfig",
        "train.harvest:harvest",
    ),
    "train": Command(
        "train one or more SAEs on an activation cache",
        "train.config:TrainConfig",
        "train.trainer:train_cli",
    ),
    "eval": Command(
        "score an SAE: reconstruction, spliced-in loss, sparsity, concept purity, absorption",
        "eval.report:EvalConfig",
        "eval.report:eval_cli",
    ),
    "dashboard": Command(
        "write a static HTML dashboard: overview, latent table, a page per latent",
        "eval.dashboard:DashboardConfig",
        "eval.dashboard:dashboard_cli",
    ),
    "compare": Command(
        "runs side by side: config differences, metrics, frontiers, dictionary similarity",
        "eval.compare:CompareConfig",
        "eval.compare:compare_cli",
    ),
    "track": Command(
        "dictionaries of successive checkpoints lined up: latents born, persisting, split, dead",
        "eval.track:TrackConfig",
        "eval.track:track_cli",
    ),
    "trajectory": Command(
        "train a small Llama on Shakespeare, its checkpoints saved as local hub revisions",
        "eval.trajectory:TrajectoryConfig",
        "eval.trajectory:trajectory_cli",
    ),
    "info": Command(
        "print a dictionary's config and weight statistics",
        "sae.cli:InfoOptions",
        "sae.cli:run_info",
    ),
    "convert": Command(
        "re-save any loadable dictionary in our (SAELens) layout",
        "sae.cli:ConvertOptions",
        "sae.cli:run_convert",
    ),
    "export": Command(
        "write dictionaries in circuit-tracer's, sparsify's or SAELens's layout",
        "sae.cli:ExportOptions",
        "sae.cli:run_export",
    ),
}


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that rejects unknown flags itself. A stock subparser hands them up
    to `sae`, whose error shows the top-level usage instead of the subcommand's; this one names
    the subcommand and suggests the closest flag."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = [
                f"did you mean {close[0]}?"
                for extra in extras
                if extra.startswith("-")
                and (close := difflib.get_close_matches(extra.split("=")[0], flags, n=1))
            ]
            self.error("; ".join([f"unrecognized arguments: {' '.join(extras)}", *hints]))
        return namespace, extras


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only `command`'s options are imported and added (all when None,
    none when "")."""
    top = argparse.ArgumentParser(
        prog="sae", description="sae-forge: train, evaluate and use sparse autoencoders."
    )
    sub = top.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=SubcommandParser
    )
    for name, spec in COMMANDS.items():
        options = _resolve(spec.options) if command in (None, name) else None
        p = sub.add_parser(
            name, help=spec.help, description=options.__doc__ if options else spec.help
        )
        if options:
            add_options(p, options)
            p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    return top


USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError, ArithmeticError)
"""Errors of what the user gave (files, names, shapes, settings): printed as one line."""


def remote_errors() -> tuple[type[Exception], ...]:
    """botocore's errors of remote storage set-up (credentials, region, endpoint, access), which
    s3fs passes up unchanged and which are not OSErrors. Looked up only if botocore was imported:
    when it was not, nothing could have raised them, and `sae --help` stays free of it."""
    boto = sys.modules.get("botocore.exceptions")
    if boto is None:
        return ()
    return (
        boto.NoCredentialsError,
        boto.PartialCredentialsError,
        boto.NoRegionError,
        boto.ConnectionError,  # EndpointConnectionError, timeouts, proxy and SSL failures
        boto.ClientError,  # the server's refusals: AccessDenied, NoSuchBucket, ...
    )


def urls(opts: Any) -> list[str]:
    """The options' values that are URLs (s3://bucket/prefix, ...): where a remote error came from."""
    return [v for f in fields(opts) if isinstance(v := getattr(opts, f.name), str) and "://" in v]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = parser(command or "").parse_args(argv)  # "": `sae --help` imports no options
    spec = COMMANDS[args.command]
    try:
        opts = build_options(_resolve(spec.options), args)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sae {args.command}: {e}") from e
    try:
        _resolve(spec.run)(opts)
    except KeyboardInterrupt:
        # one line, not the traceback of wherever Ctrl-C landed; 130 is the shell's code for SIGINT
        print(f"sae {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        remote = isinstance(e, remote_errors())
        if os.environ.get("SAE_DEBUG") or not (remote or isinstance(e, USER_ERRORS)):
            raise
        where = f" (accessing {', '.join(urls(opts))})" if remote and urls(opts) else ""
        raise SystemExit(f"sae {args.command}: {type(e).__name__}: {e}{where}") from e


if __name__ == "__main__":
    main(sys.argv[1:])
