from ziplora.cli import main

raise SystemExit(main())
