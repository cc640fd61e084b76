"""The operator dashboard: a page, its script and style (package data), and its JSON."""
