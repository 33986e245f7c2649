"""What a PyTriton client sees when its request fails: one line, never the server's traceback.

PyTriton (0.7, pytriton/proxy/inference.py) answers a failed inference callable with
`traceback.format_exception(None, e, e.__traceback__)` as the error text, which shows the
server's file paths and code, and its Python-backend proxy turns every error into a
TritonModelException (Triton's INTERNAL status: HTTP 500, gRPC INTERNAL); PyTriton has no way
for a callable to choose a client-error status. `triton-repo`'s own Python-backend models do
answer INVALID_ARGUMENT / HTTP 400 (runtime/serve/templates). Under PyTriton, the callables are
wrapped here so that the error text is the one-line message only:

* a bad request (RequestError, any UserError or ValueError) -> `ClientError: <message>`;
* anything else (a bug) is logged with its traceback on the server, and the client gets
  `ServerError: internal error (<type>); see the server's log`.

Both carry no traceback: their `__traceback__` reads as None, so PyTriton's formatting prints the
single `Type: message` line.
"""
from __future__ import annotations

import functools
import inspect
import logging

from bridge_export.runtime.errors import UserError

log = logging.getLogger(__name__)


class _Untraced(Exception):
    """An exception whose traceback is never shown: formatting it gives `Type: message` alone."""

    @property
    def __traceback__(self):  # read by traceback.format_exception; the interpreter still keeps its own
        return None

    @__traceback__.setter
    def __traceback__(self, value):
        pass


class ClientError(_Untraced, ValueError):
    """The request was bad: the message says which input and what to send instead."""


class ServerError(_Untraced, RuntimeError):
    """The server failed on a valid request (a bug): details are in the server's log only."""


def _client_facing(e: BaseException) -> Exception:
    if isinstance(e, _Untraced):
        return e
    if isinstance(e, (UserError, ValueError)):
        text = str(e).strip().splitlines()
        return ClientError(text[0] if text else type(e).__name__)
    log.error("request failed with an internal error", exc_info=e)
    return ServerError(f"internal error ({type(e).__name__}); see the server's log")


def clean_errors(infer):
    """Wrap a PyTriton inference callable (plain, generator or async generator) so that its errors reach the
    client as one line (ClientError / ServerError) without the server's traceback."""
    if inspect.isasyncgenfunction(infer):
        @functools.wraps(infer)
        async def agen(*args, **kwargs):
            try:
                async for item in infer(*args, **kwargs):
                    yield item
            except Exception as e:
                raise _client_facing(e) from None
        return agen
    if inspect.isgeneratorfunction(infer):
        @functools.wraps(infer)
        def gen(*args, **kwargs):
            try:
                yield from infer(*args, **kwargs)
            except Exception as e:
                raise _client_facing(e) from None
        return gen

    @functools.wraps(infer)
    def call(*args, **kwargs):
        try:
            return infer(*args, **kwargs)
        except Exception as e:
            raise _client_facing(e) from None
    return call


__all__ = ["ClientError", "ServerError", "clean_errors"]
