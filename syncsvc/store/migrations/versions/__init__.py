"""Revision scripts. A package so setuptools installs them (Alembic skips ``__init__``)."""
