import sys

from densemtl.cli import main

sys.exit(main())
