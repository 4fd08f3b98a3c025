"""Examples, each a script (``python3 examples/hf_moe.py --help``); a package so that tests import
them as ``examples.<name>`` (their spawned ranks unpickle ``rank_main`` from there)."""
