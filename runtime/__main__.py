"""`python -m runtime ...` is the same command as `lingli ...`."""
import sys

from .cli import main

sys.exit(main())
