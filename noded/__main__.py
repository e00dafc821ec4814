from noded.cli.main import main

raise SystemExit(main())
