"""The `edgekit` command: main.py parses and dispatches; one module per verb (or pair of verbs)."""
