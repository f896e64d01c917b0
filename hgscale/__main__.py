"""``python -m hgscale COMMAND ...`` = the ``hgscale`` console script (see hgscale.commands)."""
import sys

from hgscale.commands import main

if __name__ == "__main__":
    sys.exit(main())
