import sys

from qtorch.cli import main

sys.exit(main())
