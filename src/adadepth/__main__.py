import sys

from adadepth.cli import main

sys.exit(main())
