"""Builders the test modules share (tests/ is on sys.path: ``from support.engines import ...``)."""
