import sys

from cellvi.cli import main

sys.exit(main())
