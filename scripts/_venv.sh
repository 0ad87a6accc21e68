# Sourced by scripts/dev and scripts/test: create .venv and install Baton when needed.
if [ ! -x .venv/bin/baton ] || [ setup.cfg -nt .venv/.installed ]; then
  echo "installing Baton into .venv (first run only)..." >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >&2
  .venv/bin/pip install -q -e '.[dev]' >&2
  touch .venv/.installed
fi
