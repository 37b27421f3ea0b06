"""`tuneforge webui`: configure, launch and watch training, chat with the result and export it, in the browser."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
