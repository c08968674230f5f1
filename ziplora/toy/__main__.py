from ziplora.toy.build import main

raise SystemExit(main())
