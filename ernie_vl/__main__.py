import sys

from ernie_vl.cli import main

sys.exit(main())
