"""The `edgekit` command: main.py builds the parser from the verb modules it finds here (one module per
verb, each with VERB and ORDER), args.py holds the shared option groups, options.py makes the option
objects from user input (also for edgekit.api)."""
