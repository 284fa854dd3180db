#!/usr/bin/env python
"""Compress a RepVGG by recipe: python compress.py --recipe recipes/quickstart.yaml"""

import sys

from compress.cli import main

if __name__ == "__main__":
    sys.exit(main())
