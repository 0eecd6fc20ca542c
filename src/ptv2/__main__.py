import sys

from ptv2.cli import main

sys.exit(main())
