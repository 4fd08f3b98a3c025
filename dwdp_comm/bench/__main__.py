"""``python -m dwdp_comm.bench``: the same as the ``dwdp-bench`` script."""
from .cli import main

raise SystemExit(main())
