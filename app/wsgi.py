"""WSGI entry for gunicorn: the only module that builds an app at import time."""

from app.config import Config
from app.factory import create_app
from app.logs import setup_logging

config = Config.from_env()
setup_logging(config)
app = create_app(config)
