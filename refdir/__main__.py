"""`python -m refdir ...` is the `refdir` CLI."""

from refdir.flows.cli import main

main()
