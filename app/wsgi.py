"""WSGI entry for gunicorn: the only module that builds an app at import time."""

from app.factory import create_app

app = create_app()
