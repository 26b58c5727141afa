"""`python -m cli` runs the surgery command line."""

from cli.main import main

main()
