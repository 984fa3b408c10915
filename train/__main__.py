"""`python -m medvlm3d.train ...` and `accelerate launch [--config_file configs/accelerate/<x>.yaml]
-m medvlm3d.train --config <yaml|name> [--stage <yaml|name>] [key=value ...]`: the `train` verb
(medvlm3d/cli/train.py), with the CLI's exit-code policy (medvlm3d/cli/__init__.py).

A worker of a multi-process launch leaves through `os._exit` once the recipe has finished and
torn down (trackers closed, process group destroyed, checkpoints fsynced, logs flushed). The
process groups stay referenced from C++ (DDP's reducer and DeepSpeed's parameter hooks hold them in
cycles Python cannot collect), so their gloo threads are still running when the interpreter
finalises, and about one exit in twenty then aborted with "terminate called without an active
exception" (SIGABRT) after a successful run. Skipping the finalisation removes that race.
"""

import logging
import os
import sys

from medvlm3d.cli import run_verb
from medvlm3d.train.recipe import launched_distributed

code = 1
try:
    code = run_verb("train", sys.argv[1:], prog="medvlm3d.train")
finally:
    if launched_distributed():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
sys.exit(code)
