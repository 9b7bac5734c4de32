import sys

from nnobs.cli import main

sys.exit(main())
