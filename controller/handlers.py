"""kvctl.v1's method handlers as the daemon's server registers them: the generated
registration, with bytes in (a request that does not parse is answered INVALID_ARGUMENT
before the servicer runs) and, for GetStatus and Generate, bytes out."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from controller.errors import SERVICE
from kvctl_proto.kvctl.v1 import kvctl_pb2, kvctl_pb2_grpc

if TYPE_CHECKING:
    from controller.service import KvctlService


class Malformed:
    """What a request's deserializer gives for bytes that do not parse (_lenient)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _lenient(deserialize, type_name: str):
    """``deserialize``, but bytes that are not a ``type_name`` give a Malformed instead
    of raising: an exception there would reach the client as UNKNOWN with Python's
    exception text."""
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except DecodeError:
            return Malformed(type_name)
    return parse


def _refuse_malformed(behavior):
    @functools.wraps(behavior)
    async def handler(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed request: the bytes are not a valid "
                                f"{request.type_name} message")
        return await behavior(request, context)
    return handler


def add_to_server(service: KvctlService, server) -> None:
    """Register ``service`` as kvctl.v1.Kvctl: the generated registration, except that
    GetStatus's response and Generate's stream go out as the bytes the handler gives,
    and a request that does not parse is answered INVALID_ARGUMENT."""
    class Capture:
        handlers: dict | None = None

        def add_generic_rpc_handlers(self, handlers) -> None:
            """Ignored: the generated code offers the same methods here as one generic
            handler; the per-method handlers it passes to add_registered_method_handlers
            are registered below, both ways, with the changes."""

        def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
            self.handlers = dict(handlers)

    cap = Capture()
    kvctl_pb2_grpc.add_KvctlServicer_to_server(service, cap)
    if cap.handlers is None:
        raise RuntimeError("kvctl_pb2_grpc no longer registers method handlers; regenerate "
                           "the stubs with the pinned grpcio-tools")
    methods = kvctl_pb2.DESCRIPTOR.services_by_name["Kvctl"].methods_by_name
    # no response_serializer: GetStatus returns the cached status bytes, Generate writes
    # each message serialized (a token's by a refilled message, controller.convert)
    as_bytes = {"GetStatus", "Generate"}
    for name, h in cap.handlers.items():
        deserialize = _lenient(h.request_deserializer, methods[name].input_type.full_name)
        serialize = None if name in as_bytes else h.response_serializer
        if h.unary_unary is not None:
            cap.handlers[name] = grpc.unary_unary_rpc_method_handler(
                _refuse_malformed(h.unary_unary), deserialize, serialize)
        else:
            cap.handlers[name] = grpc.unary_stream_rpc_method_handler(
                _refuse_malformed(h.unary_stream), deserialize, serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, cap.handlers),))
    server.add_registered_method_handlers(SERVICE, cap.handlers)
