"""Run under torchrun: `clipline pretrain`'s path for the recipe in a JSON file (argv[1]),
resuming from argv[2] when given."""

import json
import sys
from pathlib import Path

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain

recipe = json.loads(Path(sys.argv[1]).read_text())
run_pretrain(load_run_config(recipe), resume=sys.argv[2] if len(sys.argv) > 2 else None)
