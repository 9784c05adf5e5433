"""``python -m launch CONFIG.yaml [key=value ...]``: run a dsa_dist job on Ray (docs/ray.md)."""

import sys

from launch.driver import main

if __name__ == "__main__":
    sys.exit(main())
