"""Write one site data file per client of a fedmole config (what the loopback deployment gives
each SuperNode; a real site brings its own file).

    python scripts/flower/split_sites.py CONFIG SITES_DIR [key=value ...]

Writes SITES_DIR/site_i/data.jsonl with client i's examples, in the order the local engine
splits them, so a deployment on these files reproduces the local engine's run.
"""

import sys

from fedmole.config import load_config
from fedmole.data.sites import export_sites

if len(sys.argv) < 3:
    sys.exit(__doc__)
for path in export_sites(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2]):
    print(path)
