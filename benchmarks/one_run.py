"""One run in a fresh Python + torch process: the original design's cost, for comparison."""

import json
import sys

from mosaicd.training import execution

channel = execution.Channel(on_epoch=lambda e: None, park_requested=lambda: False)
execution.execute(json.loads(sys.argv[1]), channel)
