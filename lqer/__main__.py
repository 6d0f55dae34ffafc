"""`python -m lqer ...` is the `lqer` command."""

from lqer.cli.main import main

main()
