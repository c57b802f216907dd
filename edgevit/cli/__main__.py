"""``python -m edgevit.cli``: the same as the ``edgevit`` command."""

from edgevit.cli import main

main()
