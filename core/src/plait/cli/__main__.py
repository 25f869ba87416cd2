"""``python -m plait.cli``: the `plait` executable."""
from plait.cli import program

program()
