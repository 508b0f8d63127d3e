"""The hosted models of a running server: an engine and a tokenizer per configured model."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import cached_property

from alignd.server.api.errors import NotFound, ServiceUnavailable
from alignd.server.engines.base import Engine
from alignd.server.engines.cpu_binding import allowed_cores, spread_cores
from alignd.server.settings import ModelSettings, Settings
from alignd.server.tokenization import ModelTokenizer

__all__ = ["HostedModel", "ModelPool", "build_engine", "core_shares"]

log = logging.getLogger(__name__)


@dataclass
class HostedModel:
    """One configured model: its settings, engine and tokenizer."""

    name: str
    settings: ModelSettings
    engine: Engine
    tokenizer: ModelTokenizer

    @property
    def is_base(self) -> bool:
        """A base model has no chat template of its own; chat requests use its plain prompt format."""
        return not self.tokenizer.has_chat_template

    @cached_property
    def vocab_signature(self) -> tuple[int, int]:
        """What must match for two models to share a vocabulary: size and a hash of the token map."""
        vocab = self.tokenizer.hf.get_vocab()
        return len(vocab), hash(frozenset(vocab.items()))


def build_engine(
    name: str, settings: ModelSettings, kv_cache_gib: float | None = None, cores: list[int] | None = None
) -> Engine:
    """The engine for a configured model: in-process vLLM (on ``cores`` when given), or a remote `vllm serve`."""
    if settings.engine == "remote":
        from alignd.server.engines.vllm_remote import RemoteVLLMEngine

        return RemoteVLLMEngine(name, settings)
    from alignd.server.engines.vllm_local import LocalVLLMEngine

    return LocalVLLMEngine(name, settings, kv_cache_gib, cores)


def core_shares(settings: Settings) -> dict[str, list[int]]:
    """The CPU cores of each in-process model under ``cpu_binding: spread`` (empty otherwise); with fewer
    cores than models, the models of each configured recipe are kept on different cores where possible."""
    local = [name for name, ms in settings.models.items() if ms.engine != "remote"]
    if settings.cpu_binding != "spread" or not local:
        return {}
    index = {name: i for i, name in enumerate(local)}
    together = [{index[r.model] for r in recipe.roles.values() if r.model in index}
                for recipe in settings.recipes.values()]
    return dict(zip(local, spread_cores(allowed_cores(), len(local), together), strict=True))


class ModelPool:
    """All hosted models; started together at server start-up and shut down together."""

    def __init__(self, settings: Settings, engines: dict[str, Engine] | None = None) -> None:
        self.settings = settings
        self._engines = engines
        self.models: dict[str, HostedModel] = {}
        self.loading = True
        self.error: BaseException | None = None

    async def start(self) -> None:
        """Load tokenizers and start every engine; a failure leaves the pool unhealthy, not crashed."""
        try:
            cores = core_shares(self.settings)
            for name, ms in self.settings.models.items():
                engine = (self._engines or {}).get(name) or build_engine(
                    name, ms, self.settings.kv_cache_gib, cores.get(name)
                )
                tokenizer = await asyncio.to_thread(ModelTokenizer, ms.path, ms.chat_template, ms.prompt_format)
                self.models[name] = HostedModel(name, ms, engine, tokenizer)
            await self._start_engines()
        except Exception as exc:
            self.error = exc
            log.exception("model start-up failed")
            raise
        finally:
            self.loading = False

    async def _start_engines(self) -> None:
        """Start the engines at the same time, except those that must start alone (one after another, beside
        the rest); the first failure cancels the others' start-up and is raised.

        Most of a vLLM engine's start-up is its processes importing vLLM, one core each, so on a CPU the
        models load side by side (what that bought: ``docs/benchmarks.md``, "Models start side by side")."""

        async def start(model: HostedModel) -> None:
            log.info("starting model %s", model.name)
            await model.engine.start()

        async def start_in_turn(models: list[HostedModel]) -> None:
            for model in models:
                await start(model)

        alone = [m for m in self.models.values() if m.engine.starts_alone]
        tasks = [asyncio.create_task(start(m)) for m in self.models.values() if not m.engine.starts_alone]
        tasks.append(asyncio.create_task(start_in_turn(alone)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # a failure, or this start-up cancelled: the others stop too (each engine cleans up)
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # not the CancelledError (a BaseException) of a stopped start
                raise outcome

    async def shutdown(self) -> None:
        """Stop every engine."""
        for model in self.models.values():
            try:
                await model.engine.shutdown()
            except Exception:
                log.exception("shutting down %s", model.name)

    def get(self, name: str, param: str = "model") -> HostedModel:
        """The hosted model called ``name``: 404 if unknown, 503 if not ready."""
        model = self.models.get(name)
        if model is None:
            if name in self.settings.models:
                raise ServiceUnavailable(f"model {name!r} is still loading")
            raise NotFound(f"The model `{name}` does not exist.", param)
        if not model.engine.ready:
            raise ServiceUnavailable(f"model {name!r} is not ready")
        return model

    @property
    def ready(self) -> bool:
        """Whether every engine is up."""
        return not self.loading and self.error is None and all(m.engine.ready for m in self.models.values())
