"""`python -m medvlm3d.cli <verb>` is the same as `medvlm3d <verb>`."""

import sys

from medvlm3d.cli import main

sys.exit(main())
