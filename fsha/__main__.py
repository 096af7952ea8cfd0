import sys

from fsha.cli import main

sys.exit(main())
