"""nbval collection: notebooks in ``pending/`` wait for their full sweeps (``make reproduce``) and
are not executed until their results files are committed; they then move up into ``notebooks/``."""

collect_ignore_glob = ["pending/*"]
