"""The public surface of ``alignd.client`` is exactly what ``__all__`` lists."""

import alignd.client

EXPECTED = {
    "__version__",
    "Client",
    "AsyncClient",
    "RetryPolicy",
    "Messages",
    "RecipeLike",
    "BaseRecipe",
    "Recipe",
    "Role",
    "RoleLike",
    "Speculative",
    "Nudging",
    "ARGS",
    "Contrastive",
    "LogitArithmetic",
    "GrammarAligned",
    "URIAL",
    "ChatCompletion",
    "ChatChoice",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "Usage",
    "Span",
    "AlignmentTrace",
    "Stream",
    "AsyncStream",
    "StreamEvent",
    "ModelInfo",
    "ModelAlignment",
    "DecoderInfo",
    "DecoderRoleInfo",
    "Health",
    "AlignError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServiceUnavailableError",
}


def test_all_is_the_expected_surface() -> None:
    assert set(alignd.client.__all__) == EXPECTED
    assert len(alignd.client.__all__) == len(EXPECTED)  # no duplicates


def test_every_export_exists_and_classes_report_the_public_module() -> None:
    for name in alignd.client.__all__:
        obj = getattr(alignd.client, name)
        if isinstance(obj, type):
            assert obj.__module__ == "alignd.client", name


def test_version_matches_the_distribution_metadata() -> None:
    from importlib.metadata import version

    assert alignd.client.__version__ == version("alignd-client")
