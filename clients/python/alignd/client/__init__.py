"""alignd's Python SDK: typed recipes, ``Client`` / ``AsyncClient`` and streaming with provenance.

>>> from alignd.client import Client, Nudging
>>> with Client() as client:
...     result = client.chat("Name a colour.", recipe=Nudging(base="tiny-base", aligner="tiny-chat"),
...                          trace=True)
...     print(result.text, result.role_token_share)
"""

from alignd.client._client import AsyncClient, Client, Messages, RecipeLike
from alignd.client._config import RetryPolicy
from alignd.client._exceptions import (
    AlignError,
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
)
from alignd.client._models import (
    AlignmentTrace,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    DecoderInfo,
    DecoderRoleInfo,
    Health,
    ModelAlignment,
    ModelInfo,
    Span,
    StreamEvent,
    Usage,
)
from alignd.client._recipes import (
    ARGS,
    URIAL,
    BaseRecipe,
    Contrastive,
    GrammarAligned,
    LogitArithmetic,
    Nudging,
    Recipe,
    Role,
    RoleLike,
    Speculative,
)
from alignd.client._streaming import AsyncStream, Stream
from alignd.client._version import __version__

__all__ = [
    "ARGS",
    "URIAL",
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AlignError",
    "AlignmentTrace",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "BaseRecipe",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Client",
    "Completion",
    "CompletionChoice",
    "Contrastive",
    "DecoderInfo",
    "DecoderRoleInfo",
    "GrammarAligned",
    "Health",
    "LogitArithmetic",
    "Messages",
    "ModelAlignment",
    "ModelInfo",
    "NotFoundError",
    "Nudging",
    "PayloadTooLargeError",
    "RateLimitError",
    "Recipe",
    "RecipeLike",
    "RetryPolicy",
    "Role",
    "RoleLike",
    "ServiceUnavailableError",
    "Span",
    "Speculative",
    "Stream",
    "StreamEvent",
    "Usage",
    "__version__",
]

# Public objects report the public module, as httpx does, so reprs and docs do not show private paths.
for _name in __all__:
    if not _name.startswith("__"):
        _obj = globals()[_name]
        if getattr(_obj, "__module__", "").startswith("alignd.client._"):
            try:
                _obj.__module__ = "alignd.client"
            except (AttributeError, TypeError):
                pass
