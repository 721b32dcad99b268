"""The project's exceptions -> gRPC status codes, in one place, and the one interceptor
that applies it (plus bearer-token auth for mutating RPCs arriving over TCP)."""
from __future__ import annotations

import hmac
import inspect
import logging

import grpc

from engine.actions import ActionError
from engine.api import EngineStopped, OutOfBlocks, Overloaded

log = logging.getLogger("kvctl.server")

SERVICE = "kvctl.v1.Kvctl"
MUTATING = frozenset(f"/{SERVICE}/{m}" for m in ("Generate", "Cancel", "SetPolicy", "Pin", "Unpin",
                                                  "DropSession"))


class UnknownSequence(KeyError):
    def __init__(self, seq_id: str) -> None:
        super().__init__(seq_id)
        self.seq_id = seq_id

    def __str__(self) -> str:
        return (f"no sequence {self.seq_id!r} on this node "
                "(finished sequences are forgotten; `kvctl sequences` lists live ones)")


class UnknownSession(KeyError):
    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return (f"no session {self.session_id!r} on this node (dropped, expired or never "
                "started; `kvctl sessions` lists them)")


class Draining(RuntimeError):
    """The daemon is shutting down and admits nothing new."""


class CapacityExceeded(RuntimeError):
    """The request can never fit this node's KV budget."""


class Unauthenticated(PermissionError):
    pass


class GenerationFailed(RuntimeError):
    """The engine ended a sequence with an error (its final message, reason ERROR, is
    already sent): the stream ends INTERNAL with the engine's error text. The engine
    logged the failure itself."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    if isinstance(exc, ActionError):          # before ValueError: it is one
        return grpc.StatusCode.FAILED_PRECONDITION, f"engine refused the action: {exc}"
    if isinstance(exc, (UnknownSequence, UnknownSession)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND, f"not found: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (CapacityExceeded, OutOfBlocks, Overloaded)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (Draining, EngineStopped)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, GenerationFailed):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc} (see the daemon's log)"


def _is_local(peer: str) -> bool:
    return peer.startswith("unix:")


class KvctlInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions from kvctl's handlers to status codes; over TCP, checks
    ``authorization: Bearer <token>`` on mutating RPCs (constant-time compare).
    Unix-socket peers are trusted: the socket's file mode is the guard.
    For the `grpc.aio` server: kvctl's handlers are coroutines (controller/service.py).

    Each method's guarded handler is built once and reused (it reads the caller's
    metadata from the call's context): every call, GetStatus included, runs on the one
    event loop, and rebuilding closures and a handler per call was work on that path."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token.encode() if token else None
        self._guarded: dict = {}          # method -> (its handler, that handler guarded)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE}/"):
            return handler
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded[method] = (handler, self._guard(method, handler))
        return cached[1]

    def _guard(self, method: str, handler):
        needs_auth = method in MUTATING

        def check(context) -> None:
            if not needs_auth or _is_local(context.peer()):
                return
            meta = context.invocation_metadata() or ()
            got = next((v for k, v in meta if k == "authorization"), "")
            scheme, _, credentials = got.partition(" ")
            # the scheme is case-insensitive (RFC 7235 section 2.1); the token is not
            given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
            if self._token is None or not hmac.compare_digest(given, self._token):
                raise Unauthenticated(
                    f"{method.rsplit('/', 1)[1]} over TCP needs 'authorization: Bearer <token>' "
                    "with the daemon's token (kvctl --token-file PATH)")

        async def abort(context, exc):
            code, msg = status_for(exc)
            if isinstance(exc, Overloaded):   # gRPC clients' retry policies honour this
                context.set_trailing_metadata(
                    (("grpc-retry-pushback-ms", str(int(exc.retry_after_s * 1000))),))
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, GenerationFailed):
                log.error("unhandled error in %s", method, exc_info=exc)
            await context.abort(code, msg)

        # unary-unary handlers return the response; unary-stream ones write with
        # context.write and return None: the same wrapper serves both
        inner = handler.unary_unary or handler.unary_stream
        if inner is None:
            return handler
        if not inspect.iscoroutinefunction(inner):
            raise TypeError(f"{method}: kvctl handlers must be coroutines on the aio server")

        async def guarded(request, context):
            try:
                check(context)
                return await inner(request, context)
            except grpc.aio.AbortError:   # the handler aborted itself: let that status stand
                raise
            except Exception as e:
                await abort(context, e)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guarded, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(
            guarded, handler.request_deserializer, handler.response_serializer)
