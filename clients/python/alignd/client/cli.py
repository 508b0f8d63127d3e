"""The ``alignd`` command line.

Commands of the SDK (they work where only ``alignd-client`` is installed)::

    alignd chat [PROMPT]        chat completion; PROMPT from stdin when "-" or absent and stdin is piped
    alignd complete [PROMPT]    text completion, same options
    alignd models list          hosted models and named recipes
    alignd decoders list        decoders, their roles and vocabularies
    alignd decoders show NAME   one decoder's roles and parameters

Streamed output is coloured by the role that wrote each span when stdout is a terminal (``--color`` /
``--no-color`` to force). Errors print one line to stderr and exit with status 1 (2 for usage errors).

Extending the command line
--------------------------
One ``alignd`` command serves every installed distribution: this module owns :func:`main` and the
parser, and other distributions (the server, third parties) add commands through entry points.

* Group ``alignd.commands`` adds top-level commands. Each entry point is a callable
  ``register(subparsers: argparse._SubParsersAction) -> None`` that calls ``subparsers.add_parser(NAME,
  help=...)`` for the command named like the entry point, adds its options, and calls
  ``parser.set_defaults(func=handler)`` with ``handler(args: argparse.Namespace) -> int`` (the exit
  status). Example: ``serve = "alignd.server.cli:register_serve"``.
* Group ``alignd.commands.<command>`` adds verbs to one of the SDK's command groups (today ``models``
  and ``decoders``), with the same protocol: ``register`` receives that group's sub-subparsers object and
  adds the verb named like the entry point. Example: ``prepare = "alignd.server.cli:register_models"`` in
  group ``alignd.commands.models`` gives ``alignd models prepare``.
* An entry point in ``alignd.commands`` named like one of those groups (``models = "..."``) is treated
  the same way: its ``register`` receives the group's sub-subparsers. It is loaded whenever the group is
  used, since its verbs are not known in advance; prefer the per-verb group above.

An entry point is imported only when the command line names it (``alignd serve ...`` imports only
``serve``; ``alignd chat`` imports none), or when help or an unknown command needs the full list. Other
names the SDK defines itself (``chat``, ``complete``, ``list``, ...) are reserved: an entry point using
one is skipped with a warning. An entry point that fails to import or register is reported on stderr as
a warning and skipped. A handler that raises :class:`~alignd.client.AlignError` gets the same one-line
error as the SDK's own commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TextIO

import httpx

from alignd.client._client import Client, RecipeLike
from alignd.client._config import API_KEY_ENV, BASE_URL_ENV, DEFAULT_MAX_RETRIES
from alignd.client._exceptions import AlignError
from alignd.client._models import ChatCompletion, Completion, DecoderInfo, Span, compute_role_token_share
from alignd.client._recipes import Recipe, Role
from alignd.client._streaming import Stream
from alignd.client._terminal import Painter, format_table, use_color
from alignd.client._version import __version__

__all__ = ["COMMANDS_GROUP", "SUBCOMMANDS_GROUP_PREFIX", "build_parser", "main"]

COMMANDS_GROUP = "alignd.commands"
SUBCOMMANDS_GROUP_PREFIX = "alignd.commands."
Register = Callable[[Any], None]


class UsageError(Exception):
    """A command line that cannot be run as given (exit status 2)."""


# ---- plug-in commands --------------------------------------------------------------------------------


def _entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group`` (a seam for tests)."""
    return list(entry_points(group=group))


def _warn(message: str) -> None:
    print(f"alignd: warning: {message}", file=sys.stderr)


def _add_plugins(
    subparsers: Any, group: str, eps: Sequence[EntryPoint], reserved: Iterable[str], wanted: str | None
) -> None:
    """Let the entry points ``eps`` (of ``group``) register on ``subparsers``.

    ``wanted`` is the name the command line asks for: when an entry point has that name only it is
    loaded; when the name is one of alignd's own (``reserved``) none is, and an entry point claiming it
    is reported; otherwise (help, a typo) all are loaded so the parser can list them.
    """
    reserved = set(reserved)
    for ep in eps:
        if ep.name in reserved and ep.name == wanted:
            _warn(
                f"ignoring entry point {ep.name!r} ({ep.value}) in group {group!r}: alignd has its own {ep.name!r}"
            )
    if wanted in reserved:
        return
    eps = [ep for ep in eps if ep.name not in reserved]
    if any(ep.name == wanted for ep in eps):
        eps = [ep for ep in eps if ep.name == wanted]
    for ep in eps:
        try:
            register = ep.load()
            register(subparsers)
        except Exception as exc:  # noqa: BLE001 (a broken plug-in must not take down the SDK's commands)
            _warn(f"command {ep.name!r} from {ep.value} is unavailable: {type(exc).__name__}: {exc}")


def _first_positionals(argv: Sequence[str], n: int) -> list[str]:
    return [a for a in argv if not a.startswith("-")][:n]


# ---- parser ------------------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument(
        "--base-url", metavar="URL", help=f"server URL (default: ${BASE_URL_ENV} or http://127.0.0.1:8000)"
    )
    group.add_argument("--api-key", metavar="KEY", help=f"bearer key (default: ${API_KEY_ENV})")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="request timeout (default: 300)")
    group.add_argument(
        "--max-retries",
        type=int,
        default=DEFAULT_MAX_RETRIES,
        metavar="N",
        help=f"retries on 429/503 and refused connections (default: {DEFAULT_MAX_RETRIES})",
    )
    group.add_argument(
        "--color",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="colour output by role (default: when stdout is a terminal)",
    )
    return parent


def _generation_parser(subparsers: Any, name: str, help: str, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(name, help=help, description=help, parents=[parent])
    p.add_argument("prompt", nargs="?", help='the prompt; "-" or absent: read stdin')
    which = p.add_argument_group("what answers (one of)")
    which.add_argument("-m", "--model", help="a hosted model or a named recipe")
    which.add_argument("-r", "--recipe", help="a named recipe (as listed by `alignd models list`)")
    which.add_argument("-d", "--decoder", help="an inline recipe's decoder (with --role and --param)")
    which.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="ROLE=MODEL",
        help='a role of the inline recipe; MODEL may be JSON: \'{"model": "m", "system_prompt": "..."}\'',
    )
    which.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a decoder parameter (of the inline recipe, or overriding a named recipe's); VALUE is parsed "
        "as JSON when it can be",
    )
    gen = p.add_argument_group("generation")
    if name == "chat":
        gen.add_argument("-s", "--system", help="a system message")
    gen.add_argument("--max-tokens", type=int, metavar="N")
    gen.add_argument("--temperature", type=float, metavar="T")
    gen.add_argument("--top-p", type=float, metavar="P")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeatable)")
    gen.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="print as it is written"
    )
    gen.add_argument("--trace", action="store_true", help="print each role's share of the output (stderr)")
    p.set_defaults(func=_run_generation, kind=name)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``alignd`` parser with the SDK's commands and the plug-in commands ``argv`` may need."""
    parser = argparse.ArgumentParser(
        prog="alignd", description="alignd: inference-time alignment of language models."
    )
    parser.add_argument("--version", action="version", version=f"alignd-client {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    parent = _connection_options()

    _generation_parser(subparsers, "chat", "chat with a model or recipe", parent)
    _generation_parser(subparsers, "complete", "complete a text prompt with a model or recipe", parent)

    groups: dict[str, Any] = {}
    models = subparsers.add_parser("models", help="hosted models and named recipes")
    groups["models"] = models_sub = models.add_subparsers(title="verbs", metavar="VERB")
    p = models_sub.add_parser("list", help="list models and recipes", parents=[parent])
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_run_models_list)

    decoders = subparsers.add_parser("decoders", help="decoding methods the server offers")
    groups["decoders"] = decoders_sub = decoders.add_subparsers(title="verbs", metavar="VERB")
    p = decoders_sub.add_parser("list", help="list decoders", parents=[parent])
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_run_decoders_list)
    p = decoders_sub.add_parser("show", help="one decoder's roles and parameters", parents=[parent])
    p.add_argument("name")
    p.set_defaults(func=_run_decoders_show)

    for name, group_parser in (("models", models), ("decoders", decoders)):
        group_parser.set_defaults(func=_group_help(group_parser))

    words = _first_positionals(argv, 2)
    command = words[0] if words else None
    top_level = _entry_points(COMMANDS_GROUP)
    _add_plugins(
        subparsers,
        COMMANDS_GROUP,
        [ep for ep in top_level if ep.name not in groups],
        subparsers.choices,
        command,
    )
    if command in groups:
        verbs = groups[command]
        verb = words[1] if len(words) > 1 else None
        group = SUBCOMMANDS_GROUP_PREFIX + command
        _add_plugins(verbs, group, _entry_points(group), verbs.choices, verb)
        # An `alignd.commands` entry point named like the group extends it; its verbs are unknown until
        # it runs, so it is always loaded with the group.
        _add_plugins(
            verbs, COMMANDS_GROUP, [ep for ep in top_level if ep.name == command], verbs.choices, None
        )
    return parser


def _group_help(group_parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show_help(args: argparse.Namespace) -> int:
        group_parser.print_help()
        return 2

    return show_help


# ---- running -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run the ``alignd`` command line; returns the exit status.

    ``transport`` replaces the network of the SDK's commands (``httpx.MockTransport`` in tests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    args.transport = transport
    try:
        return int(func(args) or 0)
    except UsageError as exc:
        print(f"alignd: error: {exc}", file=sys.stderr)
        return 2
    except AlignError as exc:
        print(f"alignd: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`alignd models list | head`): nothing left to say, and nowhere to say it.
        _silence_stdout()
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _client(args: argparse.Namespace) -> Client:
    kwargs: dict[str, Any] = {"max_retries": args.max_retries, "transport": args.transport}
    if args.timeout is not None:
        kwargs["timeout"] = httpx.Timeout(args.timeout, connect=min(args.timeout, 5.0))
    return Client(args.base_url, api_key=args.api_key, **kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_assignment(item: str, option: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"{option} expects NAME=VALUE, got {item!r}")
    return name.strip(), value


def _params(args: argparse.Namespace) -> dict[str, Any]:
    pairs = [_split_assignment(item, "--param") for item in args.param]
    return {name: _parse_value(value) for name, value in pairs}


def _inline_recipe(args: argparse.Namespace) -> Recipe:
    roles: dict[str, str | Role] = {}
    for item in args.role:
        name, value = _split_assignment(item, "--role")
        if value.lstrip().startswith("{"):
            spec = _parse_value(value)
            if not isinstance(spec, dict) or "model" not in spec:
                raise UsageError(f'--role {name}: a JSON value needs at least a "model" key')
            roles[name] = Role(**spec)
        elif value:
            roles[name] = value
        else:
            raise UsageError(f"--role {name}: no model given")
    if not roles and not args.model:
        raise UsageError("--decoder needs --role ROLE=MODEL (or --model to play every role)")
    return Recipe(args.decoder, roles, _params(args))


def _target(args: argparse.Namespace) -> tuple[str | None, RecipeLike | None, dict[str, Any]]:
    """The client's ``model``, ``recipe`` and ``recipe_params`` from --model/--recipe/--decoder/--param."""
    if args.recipe and args.decoder:
        raise UsageError("give --recipe or --decoder, not both")
    if args.recipe and args.model and args.recipe != args.model:
        raise UsageError("give --model or --recipe, not both")
    if args.role and not args.decoder:
        raise UsageError("--role describes an inline recipe: add --decoder NAME")
    if args.decoder:
        return args.model, _inline_recipe(args), {}
    if args.recipe:
        return None, args.recipe, _params(args)
    if args.model:
        return args.model, None, _params(args)
    raise UsageError("say what should answer: --model NAME, --recipe NAME, or --decoder NAME --role ...")


def _read_prompt(arg: str | None, stdin: TextIO) -> str:
    if arg is not None and arg != "-":
        return arg
    if arg == "-" or not stdin.isatty():
        text = stdin.read()
        return text.removesuffix("\n")
    raise UsageError("no prompt: give PROMPT, or pipe it on stdin")


def _run_generation(args: argparse.Namespace) -> int:
    model, recipe, recipe_params = _target(args)
    prompt = _read_prompt(args.prompt, sys.stdin)
    painter = Painter(use_color(args.color, sys.stdout))
    # Colouring needs provenance spans; ask for them where a recipe is known to be involved.
    trace = args.trace or (painter.enabled and (args.recipe is not None or args.decoder is not None))
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "recipe_params": recipe_params or None,
    }
    with _client(args) as client:
        if args.kind == "chat":
            result: ChatCompletion | Completion | Stream = client.chat(
                prompt,
                model=model,
                recipe=recipe,
                stream=args.stream,
                trace=trace,
                system=args.system,
                **params,
            )
        else:
            result = client.complete(
                prompt, model=model, recipe=recipe, stream=args.stream, trace=trace, **params
            )
        out = sys.stdout
        if isinstance(result, Stream):
            with result:
                for event in result:
                    out.write(painter.role(event.text, event.role))
                    out.flush()
            text, spans = result.text, result.spans
            share = result.role_token_share
        else:
            text, spans = result.text, result.spans
            if spans:
                out.write("".join(painter.role(s.text, s.role) for s in spans))
            else:
                out.write(text)
            share = result.role_token_share or compute_role_token_share(spans)
        if text and not text.endswith("\n"):
            out.write("\n")
        out.flush()
    _print_roles(painter, spans, share, args.trace)
    return 0


def _print_roles(painter: Painter, spans: list[Span], share: dict[str, float], trace: bool) -> None:
    """To stderr: each role's share with ``--trace``; else, when colouring, which colour is which role."""
    if trace:
        if not share:
            print("alignd: no provenance in the answer (is the model a recipe?)", file=sys.stderr)
            return
        parts = [f"{painter.role(role, role)} {100 * frac:.1f}%" for role, frac in share.items()]
        print("roles: " + "  ".join(parts), file=sys.stderr)
    elif painter.enabled and spans:
        roles = dict.fromkeys(s.role for s in spans)
        print(painter.dim("roles: ") + "  ".join(painter.role(r, r) for r in roles), file=sys.stderr)


def _run_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
        return 0
    rows = []
    for m in models:
        roles = ", ".join(f"{role}={model}" for role, model in m.alignd.role_models().items())
        base = {True: "yes", False: "no", None: "-"}[m.alignd.base_model]
        rows.append([m.id, m.kind, m.alignd.decoder or "-", roles or "-", base])
    print(format_table(["ID", "KIND", "DECODER", "ROLES", "BASE MODEL"], rows))
    return 0


def _role_names(decoder: DecoderInfo) -> str:
    return ", ".join(f"[{r.name}]" if r.optional else r.name for r in decoder.roles)


def _run_decoders_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        decoders = client.decoders()
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in decoders], indent=2))
        return 0
    rows = [
        [
            d.name,
            _role_names(d) or "-",
            "shared" if d.shared_vocab else "any",
            (d.description.strip().splitlines() or [""])[0],
        ]
        for d in decoders
    ]
    print(format_table(["NAME", "ROLES", "VOCABULARY", "DESCRIPTION"], rows))
    return 0


def _run_decoders_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        decoders = {d.name: d for d in client.decoders()}
    decoder = decoders.get(args.name)
    if decoder is None:
        known = ", ".join(sorted(decoders)) or "none"
        print(f"alignd: error: no decoder {args.name!r} on the server; available: {known}", file=sys.stderr)
        return 1
    print(f"{decoder.name}: {decoder.description.strip()}")
    print("vocabulary: " + ("shared by all roles" if decoder.shared_vocab else "any (text-level)"))
    print("roles:")
    for r in decoder.roles:
        flags = ", ".join(
            x for x in [r.task if r.task != "generate" else "", "optional" if r.optional else ""] if x
        )
        print(f"  {r.name}{f' ({flags})' if flags else ''}: {r.description}")
    props: dict[str, Any] = decoder.params_schema.get("properties", {})
    print("params:" if props else "params: none")
    for name, spec in props.items():
        default = f" = {json.dumps(spec['default'])}" if "default" in spec else ""
        desc = spec.get("description", "")
        print(f"  {name}{default}{f': {desc}' if desc else ''}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
