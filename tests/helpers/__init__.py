"""Shared by the test suites and scripts under tests/ (importable as
``helpers`` through pytest's ``pythonpath`` and the Makefile's PYTHONPATH):
the sandbox driver and image builders (``cluster``), the hostlist table
both the unit and the cluster suite check (``hostlists``), the churn run."""
