from mlk.cli import main

raise SystemExit(main())
