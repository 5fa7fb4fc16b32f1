from structmar.cli import main

raise SystemExit(main())
