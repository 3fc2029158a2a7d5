from provider import cli

raise SystemExit(cli.main())
