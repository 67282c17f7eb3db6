"""API-key check for /v1 (and /tokenize, /detokenize): a bearer token compared in constant time; /health,
/metrics, /ping and /version stay open."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import APIError

PROTECTED_PREFIX = "/v1"
# vLLM's tokenizer routes sit outside /v1 but serve the model's tokenizer: the key guards them too.
PROTECTED_PATHS = frozenset({"/tokenize", "/detokenize"})


def route_path(scope: Scope) -> str:
    """The path the routes see: without the root_path (--root-path) when the proxy left it in place.

    Checks on the raw path would miss /prefix/v1/... although the router serves it as /v1/...
    """
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


class APIKeyMiddleware:
    """Plain ASGI middleware, so the key is checked before the body is even read or parsed:
    an unauthenticated client learns nothing about what the server would accept."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("Invalid value for 'api_key': must not be empty")
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(route_path(scope)) and not self._authorized(scope):
            error = APIError(
                401,
                "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        provided = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    provided = token.strip()
                break
        # compare_digest takes the same time wherever the first difference is, so response timing
        # does not leak how much of a guessed key was right.
        return hmac.compare_digest(provided, self._expected)
