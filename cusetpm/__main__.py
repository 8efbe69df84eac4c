from cusetpm.cli import main

raise SystemExit(main())
