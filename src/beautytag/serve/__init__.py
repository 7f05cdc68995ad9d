"""The HTTP service: ``create_app`` (routes, :mod:`.app`), the micro-batcher and admission
(:mod:`.batcher`), the middleware (:mod:`.guard`), settings and the server (:mod:`.server`)."""

from beautytag.serve.app import create_app
from beautytag.serve.server import serve
from beautytag.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]
