"""The README's main command: the ``demo`` preset of the accuracy-vs-bytes sweep.

    python -m simulations.demo            # same as: python -m simulations.sweep --preset demo

Extra arguments are passed to :func:`simulations.sweep.main` (e.g. ``--rounds 4``).
"""

from __future__ import annotations

import sys

from simulations.sweep import main

if __name__ == "__main__":
    sys.exit(main(["--preset", "demo", *sys.argv[1:]]))
