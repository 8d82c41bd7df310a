import sys

from lorakern.cli import main

sys.exit(main())
