import sys

from tldr_fast.cli import main

sys.exit(main())
