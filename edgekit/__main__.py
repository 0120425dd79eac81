from edgekit.cli.main import main

raise SystemExit(main())
