"""The ``alignd`` command line, run in-process with a fake server behind ``httpx.MockTransport``."""

from __future__ import annotations

import argparse
import io
import json
import sys
from importlib.metadata import EntryPoint
from typing import Any

import httpx
import pytest

from alignd.client import cli

from .conftest import (
    DECODERS,
    MODELS,
    FakeServer,
    chat_chunk,
    chat_result,
    completion_result,
    error_body,
    span,
    sse_response,
)

BASE = ["--base-url", "http://alignd.test"]


def run(server: FakeServer, *argv: str) -> int:
    return cli.main(list(argv), transport=server.transport)


class TtyStdin(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[EntryPoint]]:
    """No installed plug-ins unless a test adds some (``groups[group] = [...]``)."""
    groups: dict[str, list[EntryPoint]] = {}
    monkeypatch.setattr(cli, "_entry_points", lambda group: list(groups.get(group, [])))
    monkeypatch.setattr(sys, "stdin", TtyStdin(""))
    return groups


def stream_of_nudging() -> httpx.Response:
    return sse_response(
        chat_chunk("The sky", spans=[span("The sky", "base", "p=0.9", [1, 2, 3])]),
        chat_chunk(" is", spans=[span(" is", "aligner", "nudged", [4])], finish="stop"),
    )


# ---- chat and complete ----------------------------------------------------------------------------------


def test_chat_prints_the_answer(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("Blue.")))
    code = run(
        server,
        "chat",
        "What colour is the sky?",
        "--model",
        "tiny-chat",
        "--no-stream",
        "--system",
        "Be brief.",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--seed",
        "7",
        *BASE,
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert out == "Blue.\n" and err == ""
    assert server.body() == {
        "model": "tiny-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        "max_tokens": 16,
        "temperature": 0.0,
        "seed": 7,
        "stream": False,
    }
    assert str(server.requests[0].url) == "http://alignd.test/v1/chat/completions"


def test_streamed_recipe_output_is_coloured_by_role(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.on("POST", "/v1/chat/completions", stream_of_nudging())
    assert run(server, "chat", "Q", "--recipe", "tiny-nudging", "--color", *BASE) == 0
    out, err = capsys.readouterr()
    assert out == "The sky\x1b[32m is\x1b[0m\n"  # base uncoloured, aligner green
    body = server.body()
    assert body["model"] == "tiny-nudging" and body["stream"] is True
    assert body["alignment"] == {"trace": True}  # colouring needs the spans
    assert "roles:" in err and "\x1b[32maligner\x1b[0m" in err


def test_trace_prints_each_roles_share(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("POST", "/v1/chat/completions", stream_of_nudging())
    assert run(server, "chat", "Q", "-r", "tiny-nudging", "--trace", "--no-color", *BASE) == 0
    out, err = capsys.readouterr()
    assert out == "The sky is\n"
    assert err == "roles: base 75.0%  aligner 25.0%\n"


def test_plain_output_without_colour_does_not_ask_for_a_trace(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.on("POST", "/v1/chat/completions", stream_of_nudging())
    assert run(server, "chat", "Q", "-r", "tiny-nudging", *BASE) == 0  # capsys stdout is not a tty
    assert "alignment" not in server.body()
    assert capsys.readouterr().out == "The sky is\n"


def test_non_streamed_trace_uses_the_servers_share(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    spans = [span("A", "base", token_ids=[1]), span("B", "aligner", token_ids=[2])]
    result = completion_result("AB", spans=spans, share={"base": 0.2, "aligner": 0.8})
    server.on("POST", "/v1/completions", httpx.Response(200, json=result))
    assert run(server, "complete", "Q", "-m", "rec", "--no-stream", "--trace", "--color", *BASE) == 0
    out, err = capsys.readouterr()
    assert out == "A\x1b[32mB\x1b[0m\n"
    assert "base 20.0%" in err and "80.0%" in err


def test_prompt_from_stdin(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server.on("POST", "/v1/completions", httpx.Response(200, json=completion_result(" a time")))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon\n"))
    assert run(server, "complete", "--model", "tiny-base", "--no-stream", *BASE) == 0
    assert server.body()["prompt"] == "Once upon"
    monkeypatch.setattr(sys, "stdin", TtyStdin("typed at the terminal\n"))
    assert run(server, "complete", "-", "--model", "tiny-base", "--no-stream", *BASE) == 0
    assert server.body()["prompt"] == "typed at the terminal"


def test_no_prompt_at_a_terminal_is_a_usage_error(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(server, "chat", "--model", "m", *BASE) == 2
    assert capsys.readouterr().err == "alignd: error: no prompt: give PROMPT, or pipe it on stdin\n"
    assert server.requests == []


def test_inline_recipe_from_decoder_roles_and_params(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("ok")))
    code = run(
        server,
        "chat",
        "Q",
        "--decoder",
        "contrastive",
        "--role",
        "expert=tiny-chat",
        "--role",
        'amateur={"model": "tiny-chat", "system_prompt": "Be rude."}',
        "--param",
        "beta=0.5",
        "--param",
        "note=plain text",
        "--param",
        "adaptive=true",
        "--no-stream",
        *BASE,
    )
    assert code == 0
    body = server.body()
    assert body["model"] == "tiny-chat"
    assert body["alignment"] == {
        "decoder": "contrastive",
        "roles": {"expert": "tiny-chat", "amateur": {"model": "tiny-chat", "system_prompt": "Be rude."}},
        "params": {"beta": 0.5, "note": "plain text", "adaptive": True},
    }


def test_param_overrides_a_named_recipe_and_model_plays_every_role(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("ok")))
    assert run(server, "chat", "Q", "-r", "tiny-nudging", "--param", "gamma=0.2", "--no-stream", *BASE) == 0
    assert server.body()["model"] == "tiny-nudging"
    assert server.body()["alignment"] == {"params": {"gamma": 0.2}}
    assert run(server, "chat", "Q", "-d", "urial", "-m", "tiny-base", "--no-stream", *BASE) == 0
    assert server.body()["model"] == "tiny-base"
    assert server.body()["alignment"] == {"decoder": "urial", "roles": {}, "params": {}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "base=m"], "--role describes an inline recipe"),
        (["--recipe", "r", "--decoder", "nudging", "--role", "base=m"], "--recipe or --decoder"),
        (["--decoder", "nudging"], "--decoder needs --role"),
        (["--decoder", "nudging", "--role", "base"], "--role expects NAME=VALUE"),
        (["--decoder", "nudging", "--role", 'base={"system_prompt": "x"}'], 'needs at least a "model"'),
        ([], "say what should answer"),
    ],
)
def test_target_usage_errors(
    server: FakeServer, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(server, "chat", "Q", *argv, *BASE) == 2
    err = capsys.readouterr().err
    assert err.startswith("alignd: error: ") and message in err and err.count("\n") == 1
    assert server.requests == []


# ---- errors ---------------------------------------------------------------------------------------------


def test_server_error_is_one_line_and_exit_1(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on(
        "POST",
        "/v1/chat/completions",
        httpx.Response(
            404,
            json=error_body(
                "model 'nope' not found;\n try `alignd models list`", "not_found_error", param="model"
            ),
        ),
    )
    assert run(server, "chat", "Q", "-m", "nope", *BASE) == 1
    assert capsys.readouterr().err == (
        "alignd: error: 404: model 'nope' not found; try `alignd models list` (param: model)\n"
    )


def test_connection_refused_says_the_server_is_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list", "--base-url", "http://127.0.0.1:9", "--max-retries", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alignd: error: the alignd server is not running at http://127.0.0.1:9")
    assert err.count("\n") == 1


def test_base_url_from_the_environment(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALIGND_BASE_URL", "http://from-env.test")
    monkeypatch.setenv("ALIGND_API_KEY", "k1")
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    assert run(server, "models", "list") == 0
    assert str(server.requests[0].url) == "http://from-env.test/v1/models"
    assert server.requests[0].headers["authorization"] == "Bearer k1"


# ---- models and decoders --------------------------------------------------------------------------------


def test_models_list_table(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    assert run(server, "models", "list", *BASE) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID            KIND    DECODER  ROLES                              BASE MODEL",
        "tiny-base     model   -        -                                  yes",
        "tiny-chat     model   -        -                                  no",
        "tiny-nudging  recipe  nudging  base=tiny-base, aligner=tiny-chat  -",
    ]
    assert run(server, "models", "list", "--json", *BASE) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == [
        "tiny-base",
        "tiny-chat",
        "tiny-nudging",
    ]


def test_decoders_list_and_show(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("GET", "/v1/alignment/decoders", httpx.Response(200, json=DECODERS))
    assert run(server, "decoders", "list", *BASE) == 0
    assert capsys.readouterr().out.splitlines() == [
        "NAME     ROLES           VOCABULARY  DESCRIPTION",
        "nudging  base, aligner   any         Base writes; aligner nudges where the base is unsure.",
        "args     base, [reward]  shared      Reward-guided search.",
    ]
    assert run(server, "decoders", "show", "nudging", *BASE) == 0
    out = capsys.readouterr().out
    assert "roles:\n  base: writes\n  aligner: nudges\n" in out
    assert "  gamma = 0.4: top-1 probability cut" in out
    assert run(server, "decoders", "show", "args", *BASE) == 0
    assert "  reward (reward, optional): scores" in capsys.readouterr().out
    assert run(server, "decoders", "show", "nope", *BASE) == 1
    assert "available: args, nudging" in capsys.readouterr().err


# ---- help and plug-in commands --------------------------------------------------------------------------


def test_bare_command_and_bare_group_print_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "chat" in capsys.readouterr().out
    assert cli.main(["models"]) == 2
    assert "list" in capsys.readouterr().out


def _ep(name: str, attr: str, group: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"{__name__}:{attr}", group=group)


CALLS: list[str] = []


def register_serve(subparsers: Any) -> None:
    CALLS.append("register serve")
    p = subparsers.add_parser("serve", help="run the server")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=lambda args: CALLS.append(f"serve {args.port}") or 3)


def register_models(models_subparsers: Any) -> None:
    CALLS.append("register prepare")
    p = models_subparsers.add_parser("prepare", help="download and convert the default models")
    p.set_defaults(func=lambda args: CALLS.append("prepare") or 0)


def register_broken(subparsers: Any) -> None:
    raise RuntimeError("needs vllm")


def register_collision(subparsers: Any) -> None:  # registered under the reserved name "chat"
    CALLS.append("collision imported")
    subparsers.add_parser("chat")


@pytest.fixture
def plugins(no_plugins: dict[str, list[EntryPoint]]) -> None:
    CALLS.clear()
    no_plugins["alignd.commands"] = [
        _ep("serve", "register_serve", "alignd.commands"),
        _ep("broken", "register_broken", "alignd.commands"),
        _ep("chat", "register_collision", "alignd.commands"),
    ]
    no_plugins["alignd.commands.models"] = [_ep("prepare", "register_models", "alignd.commands.models")]


@pytest.mark.usefixtures("plugins")
def test_plugin_commands_run_and_only_the_named_one_is_imported(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "9001"]) == 3
    assert CALLS == ["register serve", "serve 9001"]
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("plugins")
def test_plugin_verbs_join_the_sdks_models_group(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "prepare"]) == 0
    assert CALLS == ["register prepare", "prepare"]
    assert capsys.readouterr().err == ""
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    assert run(server, "models", "list", *BASE) == 0
    assert "tiny-nudging" in capsys.readouterr().out
    assert CALLS == ["register prepare", "prepare"]  # `models list` names no plug-in verb: none loaded


@pytest.mark.usefixtures("plugins")
def test_sdk_commands_import_no_plugins_and_reserved_names_are_refused(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("hi")))
    assert run(server, "chat", "Q", "-m", "m", "--no-stream", *BASE) == 0
    assert CALLS == []
    out, err = capsys.readouterr()
    assert out == "hi\n"
    assert err == (
        "alignd: warning: ignoring entry point 'chat' "
        f"({__name__}:register_collision) in group 'alignd.commands': alignd has its own 'chat'\n"
    )


def test_an_entry_point_named_like_a_group_extends_it(
    no_plugins: dict[str, list[EntryPoint]], capsys: pytest.CaptureFixture[str]
) -> None:
    CALLS.clear()
    no_plugins["alignd.commands"] = [_ep("models", "register_models", "alignd.commands")]
    assert cli.main(["models", "prepare"]) == 0
    assert CALLS == ["register prepare", "prepare"]
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert CALLS == ["register prepare", "prepare"]  # top-level help does not need the group's verbs


@pytest.mark.usefixtures("plugins")
def test_help_lists_plugins_and_reports_broken_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert "serve" in out and "run the server" in out
    assert "alignd: warning: command 'broken'" in err and "RuntimeError: needs vllm" in err
    assert "collision imported" not in CALLS
    with pytest.raises(SystemExit):
        cli.main(["models", "--help"])
    assert "prepare" in capsys.readouterr().out


def test_parser_is_buildable_without_argv() -> None:
    parser = cli.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    args = parser.parse_args(["complete", "x", "-m", "m"])
    assert args.func is cli._run_generation and args.kind == "complete" and args.stream is True
