"""The `make bench` suite: every contender, every workload, one run, one report (see __main__.py)."""
