"""The project's exceptions -> gRPC status codes, in one place, and the one interceptor
that applies it (plus bearer-token auth for mutating RPCs arriving over TCP)."""
from __future__ import annotations

import hmac
import logging

import grpc

from engine.actions import ActionError

log = logging.getLogger("kvctl.server")

SERVICE = "kvctl.v1.Kvctl"
MUTATING = frozenset(f"/{SERVICE}/{m}" for m in ("Generate", "Cancel", "SetPolicy", "Pin", "Unpin"))


class UnknownSequence(KeyError):
    def __init__(self, seq_id: str) -> None:
        super().__init__(seq_id)
        self.seq_id = seq_id

    def __str__(self) -> str:
        return (f"no sequence {self.seq_id!r} on this node "
                "(finished sequences are forgotten; `kvctl sequences` lists live ones)")


class Draining(RuntimeError):
    """The daemon is shutting down and admits nothing new."""


class CapacityExceeded(RuntimeError):
    """The request can never fit this node's KV budget."""


class Unauthenticated(PermissionError):
    pass


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    if isinstance(exc, ActionError):          # before ValueError: it is one
        return grpc.StatusCode.FAILED_PRECONDITION, f"engine refused the action: {exc}"
    if isinstance(exc, UnknownSequence):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND, f"not found: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, CapacityExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Draining):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc} (see the daemon's log)"


def _is_local(peer: str) -> bool:
    return peer.startswith("unix:")


class KvctlInterceptor(grpc.ServerInterceptor):
    """Maps exceptions from kvctl's handlers to status codes; over TCP, checks
    ``authorization: Bearer <token>`` on mutating RPCs (constant-time compare).
    Unix-socket peers are trusted: the socket's file mode is the guard."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token.encode() if token else None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE}/"):
            return handler
        needs_auth = method in MUTATING
        meta = handler_call_details.invocation_metadata or ()

        def check(context) -> None:
            if not needs_auth or _is_local(context.peer()):
                return
            got = next((v for k, v in meta if k == "authorization"), "")
            given = got[7:].encode() if got.startswith("Bearer ") else b""
            if self._token is None or not hmac.compare_digest(given, self._token):
                raise Unauthenticated(
                    f"{method.rsplit('/', 1)[1]} over TCP needs 'authorization: Bearer <token>' "
                    "with the daemon's token (kvctl --token-file PATH)")

        def abort(context, exc):
            code, msg = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
            context.abort(code, msg)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                try:
                    check(context)
                    return inner(request, context)
                except Exception as e:
                    if _is_abort(context):
                        raise
                    abort(context, e)
            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_s = handler.unary_stream

            def stream(request, context):
                try:
                    check(context)
                    yield from inner_s(request, context)
                except Exception as e:
                    if _is_abort(context):
                        raise
                    abort(context, e)
            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        return handler


def _is_abort(context) -> bool:
    """True once the handler itself called context.abort (let that status stand)."""
    state = getattr(context, "_state", None)
    return state is not None and getattr(state, "code", None) is not None \
        and state.code != grpc.StatusCode.OK
