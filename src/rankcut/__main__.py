"""``python -m rankcut``: the command line, as ``torchrun -m rankcut compress ...`` launches it."""

from .cli import app

app()
