import sys

from ernie_vl.app.cli import main

sys.exit(main())
