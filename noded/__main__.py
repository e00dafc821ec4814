from noded.cli import main

raise SystemExit(main())
