"""`python -m surgery` runs the surgery command line."""

from surgery.cli.main import main

main()
