import sys

from tokenslice.cli import main

sys.exit(main())
