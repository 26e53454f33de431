import sys

from snapscale.cli import main

sys.exit(main())
