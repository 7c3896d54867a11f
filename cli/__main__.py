"""`python -m kronograph.cli` runs the `kronograph` command."""

from kronograph.cli.main import main

main()
