import sys

from qrunlearn.cli import main

sys.exit(main())
