"""One suite of behaviour tests every calendar provider passes (vdirsyncer style)."""
