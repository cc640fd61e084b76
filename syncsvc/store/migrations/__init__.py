"""Alembic migrations, shipped inside the package so ``syncsvc migrate`` needs no alembic.ini."""
