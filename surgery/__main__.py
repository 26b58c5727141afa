"""`python -m surgery` runs the surgery command line."""

import sys

try:
    from surgery.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: one line, no traceback
    sys.stderr.write("interrupted; no output was written\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
